"""Fixtures of the attribution tests: a local lm-eval task (the tiny random Llama is in tests/conftest.py)."""
import json
import textwrap

import pytest

TASK_YAML = textwrap.dedent(
    """
    task: tiny_qa
    dataset_path: json
    dataset_kwargs:
      data_files:
        test: {data}
    test_split: test
    output_type: generate_until
    doc_to_text: "Q: {{{{question}}}}\\nA:"
    doc_to_target: "{{{{answer}}}}"
    generation_kwargs:
      until: ["\\n"]
    metric_list:
      - metric: exact_match
    """
)


@pytest.fixture
def local_task(tmp_path):
    pytest.importorskip("lm_eval")
    data = tmp_path / "tiny_qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [{"question": "a for loop", "answer": "list"},
                                                      {"question": "data privacy", "answer": "the statement"}]))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_qa.yaml").write_text(TASK_YAML.format(data=data))
    return str(tmp_path / "tasks")


