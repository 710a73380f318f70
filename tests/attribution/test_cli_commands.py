"""The commands of `grass-attribute` as data (attribution.llm.commands): every command builds from its flag
declarations, each flag's declared default is the parsed one, a --config file fills in what the command line
does not give, CacheConfig reads and writes cli.json byte for byte, and the bench does not import the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from attribution.llm import bench, cli
from attribution.llm.commands import COMMANDS, cache, flags
from attribution.llm.config import CACHE_KEYS, CacheConfig

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {"--store": "some/store"}  # a value for every required flag


def _required(command) -> list[str]:
    return [x for flag in command.flags if flag.required for x in (flag.name, REQUIRED[flag.name])]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_command_builds_and_parses_its_declared_defaults(command):
    parser = cli.build_parser()
    args = parser.parse_args([command.name, *_required(command)])
    alone = command.parse(_required(command))  # the command's own parser (what the bench's job child uses)
    assert args.func is command.run and alone.func is command.run
    seen = set()
    for flag in command.flags:
        if flag.key in seen:  # --no-compile: its destination's default is --compile's
            continue
        seen.add(flag.key)
        expected = REQUIRED[flag.name] if flag.required else flag.default
        assert getattr(args, flag.key) == expected == getattr(alone, flag.key), f"{command.name} {flag.name}"
    for key, value in command.defaults.items():
        assert getattr(args, key) == value


def test_the_cache_flags_are_the_cache_configuration_with_its_defaults():
    args = cli.build_parser().parse_args(["cache", "--store", "s"])
    assert CacheConfig.from_args(args) == CacheConfig()
    assert {flag.key for flag in cache.CONFIG_FLAGS} == set(CACHE_KEYS)
    demo = cli.build_parser().parse_args(["demo"])
    assert CacheConfig.from_args(demo) == CacheConfig()  # the demo's fixed model and corpus flags: the defaults


def test_config_file_values_apply_and_the_command_line_wins(tmp_path, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(bench, "run", lambda **kwargs: seen.update(kwargs) or {"rows": 1})
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"ks": [1, 2], "repeats": 7, "fingerprint": True, "dtype": "bfloat16", "models": "gpt2-random"}))
    assert cli.run(["--config", str(config), "bench", "--ks", "8", "--no-fingerprint"]) == {"rows": 1}
    assert (seen["ks"], seen["repeats"], seen["fingerprint"], seen["dtype"], seen["models"]) == ([8], 7, False, "bfloat16",
                                                                                                  ["gpt2-random"])
    capsys.readouterr()


@pytest.mark.parametrize("values, flags", [
    ({"compile": False, "limit": "all", "layers": "model.layers.*"}, ["--no-compile", "--limit", "all", "--layers", "model.layers.*"]),
    ({"compile": True, "masks": "random", "damping": 0.5}, ["--compile", "--masks", "random", "--damping", "0.5"]),
    ({"k": 8, "seed": 3}, ["--seed", "3"]),  # --k is given on the command line
])
def test_config_values_become_the_flags_of_their_declarations(values, flags):
    assert cli.config_flags(cache.COMMAND, values, "c.json", given={"k"}) == flags


@pytest.mark.parametrize("values, message", [
    ({"bogus": 1}, "unknown keys ['bogus'] for `cache`"),
    ({"masks": "sparse"}, "masks must be one of ['energy', 'random']"),
    ({"k": [1, 2]}, "k must be a single value"),
    ([1], "must hold a JSON object of flag values"),
])
def test_bad_config_values_are_usage_errors(values, message):
    with pytest.raises(cli.CLIError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cli.config_flags(cache.COMMAND, values, "c.json", given=set())


def test_cache_config_reads_and_writes_cli_json_byte_for_byte(tmp_path):
    # cli.json as `grass-attribute cache` wrote it before CacheConfig (a flags dict keyed by CACHE_KEYS)
    text = ('{\n "corpus": {\n  "documents": 6,\n  "segments": [\n   3,\n   3\n  ],\n  "sha256": "ab12"\n },\n "flags": {\n'
            '  "autocast": "none",\n  "batch_size": 4,\n  "completion_field": null,\n  "compressor": "factgrass:blowup=4",\n'
            '  "corpus": "corpus.jsonl",\n  "damping": 0.001,\n  "dataset": null,\n  "dtype": "float32",\n'
            '  "gguf_file": null,\n  "k": 16,\n  "layers": [\n   "model.layers.*"\n  ],\n  "limit": null,\n'
            '  "mask_documents": 32,\n  "masks": "energy",\n  "max_length": 32,\n  "messages_field": null,\n'
            '  "model": "tiny",\n  "prompt_field": null,\n  "seed": 0,\n  "split": null,\n  "storage_dtype": "float32",\n'
            '  "text_field": "text",\n  "token_batch_size": null\n }\n}\n')
    (tmp_path / "cli.json").write_text(text)
    config, corpus = CacheConfig.read(tmp_path)
    assert config.layers == ("model.layers.*",) and config.limit is None and config.k == 16
    assert config.record_text(corpus) == text
    assert CacheConfig.from_dict(json.loads(text)["flags"]) == config and hash(config) == hash(CacheConfig(**vars(config)))
    assert config.differing(CacheConfig.from_dict({**config.as_dict(), "limit": 3, "k": 8})) == ["k"]  # --limit grows


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def test_the_bench_does_not_import_the_cli():
    done = _fresh("import sys, attribution.llm.bench, attribution.llm.commands.bench, attribution.llm.demo\n"
                  "print(sorted(m for m in sys.modules if m.endswith('cli')))")
    assert done.returncode == 0, done.stderr
    assert "attribution.llm.cli" not in done.stdout and "attribution.cli" not in done.stdout


def test_the_old_module_names_still_run_and_import():
    done = subprocess.run([sys.executable, "-m", "attribution.cli", "verify", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout.startswith("usage: grass-attribute verify"), done.stderr
    done = _fresh("import attribution.cli, attribution.llm.cli, attribution.report, attribution.llm.report\n"
                  "assert attribution.cli is attribution.llm.cli and attribution.report is attribution.llm.report")
    assert done.returncode == 0, done.stderr


def test_the_commands_use_no_argparse_internals():
    sources = [p.read_text() for p in (ROOT / "attribution" / "llm").rglob("*.py")]
    for private in ("._actions", "_add_action", "_SubParsersAction", "_AppendAction", "_get_help_string"):
        assert not any(private in s for s in sources), private
    assert flags.Flag("--x", "help").key == "x"
