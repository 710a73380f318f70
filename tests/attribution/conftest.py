"""Fixtures of the attribution tests: a tiny random Llama saved to a folder, a local lm-eval task."""
import json
import textwrap

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_llama")
    words = "the a for loop lambda assert python list data privacy statement expression creates function".split()
    vocab = {"<unk>": 0, "<pad>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<pad>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


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


