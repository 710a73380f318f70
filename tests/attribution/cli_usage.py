"""The shared check of `grass-attribute attribute` usage errors: exit status 2, the message on stderr's last line."""
from attribution.llm import cli


def attribute_usage_error(store, prompts, out, flags: list[str], capsys) -> str:
    """Run ``attribute`` on ``store`` with ``prompts`` and ``flags``; assert it exits 2 without a traceback and
    return stderr's last line (argparse's own errors exit from inside main, the command's return 2)."""
    try:
        code = cli.main(["attribute", "--store", str(store), "--prompts", str(prompts), "--out", str(out), *flags])
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]
