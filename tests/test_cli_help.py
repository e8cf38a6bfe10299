"""Every subcommand's --help runs, and every default it states is the parser's real default.

Commands are discovered from the three console scripts' command tables, so a new command is
checked without touching this file. The rule for a documented default, ``(default: X)`` in a
flag's help (after argparse expands ``%(default)s``):

- the value is X up to the first ``"; "`` or ``", "`` (what follows is explanation);
- when the parser default is a value, the value must equal it as help texts write it
  (:func:`xray.cli_base.format_default`; numbers compared as numbers);
- when the parser default is ``None`` (decided later: by a model, a config, a stage), the value
  must not pretend to be one: it is ``none``/``off``/``all``/``auto`` (``--device``), or words (contains a space), or a
  placeholder in capitals (``runs/scan-ILLNESS-SOURCE``), or a folder in the user's home that
  the code falls back to (``~/.cache/boed``).
"""

from __future__ import annotations

import argparse
import functools
import re
from pathlib import Path

import pytest

import boed.cli
import ipa_core.cli
import xray.cli
from xray.cli_base import DEFAULT_DEVICE, format_default

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"boed": boed.cli.main, "ipa_core": ipa_core.cli.main, "xray": xray.cli.main}
COMMANDS = [(script, name) for script, main in SCRIPTS.items() for name in main.commands]
DEFAULT_RE = re.compile(r"\(default: ((?:[^()]|\([^()]*\))*)\)")
NONE_WORDS = {"none", "off", "all", "auto"}  # None is auto for parse_device


@functools.lru_cache(maxsize=None)
def subparser(script: str, command: str) -> argparse.ArgumentParser:
    parser = SCRIPTS[script].build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def expanded_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return " ".join(parser._get_formatter()._expand_help(action).split()) if action.help else ""


def documented_value(text: str) -> str:
    return re.split(r"; |, ", text, maxsplit=1)[0].strip()


def matches(value: str, default) -> bool:
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return value == format_default(default)
    try:
        return float(value) == float(default)
    except ValueError:
        return False


def options(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_commands_are_discovered():
    assert {("boed", "run"), ("boed", "evaluate"), ("ipa_core", "train"), ("ipa_core", "sample"),
            ("xray", "phantom")} <= set(COMMANDS)


@pytest.mark.parametrize("script,command", COMMANDS)
def test_help_runs(script, command, capsys):
    with pytest.raises(SystemExit) as e:
        SCRIPTS[script]([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {script} {command}")
    assert "Traceback" not in out


@pytest.mark.parametrize("script,command", COMMANDS)
def test_documented_defaults_are_the_real_ones(script, command):
    p = subparser(script, command)
    wrong = []
    for a in options(p):
        for text in DEFAULT_RE.findall(expanded_help(p, a)):
            value = documented_value(text)
            if a.default is None or a.default is argparse.SUPPRESS:
                ok = (value in NONE_WORDS or " " in value or value.startswith("~/")
                      or re.search(r"[A-Z]{3,}", value) is not None)
            else:
                ok = matches(value, a.default)
            if not ok:
                wrong.append(f"{a.option_strings[0]}: help says (default: {text}), parser default is {a.default!r}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("script,command", COMMANDS)
def test_every_flag_has_help_and_states_its_default(script, command):
    """A flag with a real default (not None/False) says which; every flag has a help text."""
    p = subparser(script, command)
    missing = []
    for a in options(p):
        if not a.help:
            missing.append(f"{a.option_strings[0]}: no help")
        elif (a.default not in (None, False, argparse.SUPPRESS) and a.nargs != 0  # switches: not given = off
              and "(default: " not in expanded_help(p, a)):
            missing.append(f"{a.option_strings[0]}: default {a.default!r} not stated")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("script,command", COMMANDS)
def test_one_device_flag_and_verbose_after_the_command(script, command):
    p = subparser(script, command)
    acts = p._option_string_actions
    assert "-v" in acts and "--verbose" in acts
    if "--device" in acts:
        assert acts["--device"].default in (DEFAULT_DEVICE, None)  # None: parse_device reads it as auto
        assert f"(default: {DEFAULT_DEVICE})" in expanded_help(p, acts["--device"])


@pytest.mark.parametrize("script,command", COMMANDS)
def test_one_metavar_style(script, command):
    """Folders are DIR, files FILE; no per-command names like RUN, OUT, CACHE, PNG, IPA."""
    p = subparser(script, command)
    bad = {a.option_strings[0]: a.metavar for a in options(p)
           if a.metavar in ("RUN", "OUT", "CACHE", "PNG", "IPA", "AVP", "PATH_TO", "FOLDER")}
    assert not bad


def test_verbose_is_accepted_before_and_after_the_command():
    parser = boed.cli.main.build_parser()
    assert parser.parse_args(["run", "-v"]).verbose is True
    assert parser.parse_args(["-v", "run"]).verbose is True
    assert parser.parse_args(["run"]).verbose is False


def test_train_help_lists_both_stages_from_the_constants():
    from ipa_core.ipa_task import IPA_TRAIN_DEFAULTS
    from ipa_core.vae_task import TRAIN_DEFAULTS

    p = subparser("ipa_core", "train")
    acts = p._option_string_actions
    vae, ipa = TRAIN_DEFAULTS["tiny"], IPA_TRAIN_DEFAULTS["tiny"]
    for option, field in (("--steps", "steps"), ("--batch-size", "batch_size"), ("--lr", "lr")):
        text = expanded_help(p, acts[option])
        assert f"{format_default(getattr(vae, field))} in the VAE stage" in text
        assert f"{format_default(getattr(ipa, field))} in the IPA stage" in text
    assert "(default: 64)" not in expanded_help(p, acts["--image-size"])
    assert "(default: 64)" not in expanded_help(subparser("boed", "evaluate"), subparser("boed", "evaluate")._option_string_actions["--image-size"])
    epilog = p.epilog
    for name, d in TRAIN_DEFAULTS.items():
        assert f"{name}: steps {d.steps}," in epilog


def test_train_avp_defaults_are_what_runs():
    """One stage: the parser defaults are the TrainConfig the command builds."""
    from boed.commands.train_avp import _defaults
    from ipa_core.trainer import train_config_from_args

    p = subparser("boed", "train-avp")
    args = p.parse_args(["--out", "x", "--device", "cpu"])
    assert train_config_from_args(args, _defaults()) == _defaults().__class__(**{**vars(_defaults()), "device": "cpu"})


def test_demo_time_is_stated_once_and_agrees_with_the_readme():
    from boed.commands.demo import CPU_DEMO_MINUTES

    readme = (ROOT / "README.md").read_text()
    said = set(re.findall(r"~(\d+) min on 2 CPU cores", readme))
    assert said == {str(CPU_DEMO_MINUTES)}
    p = subparser("boed", "demo")
    text = expanded_help(p, p._option_string_actions["--profile"])
    assert f"about {CPU_DEMO_MINUTES} min" in text
    assert "results/" in p.description  # says that `make demo` rewrites the tracked results/


def test_torchrun_is_shown_one_way():
    """`torchrun --nproc-per-node N -m <package>.cli ...` everywhere (docs and help)."""
    texts = [(ROOT / "README.md").read_text()]
    texts += [subparser(s, c).description or "" for s, c in COMMANDS]
    for text in texts:
        assert "nproc_per_node" not in text
        assert "$(which" not in text
        for line in re.findall(r"torchrun [^\n`]*", text):
            assert re.match(r"torchrun --nproc-per-node \S+ -m (boed|ipa_core|xray)\.cli ", line), line


def test_list_flags_are_comma_separated():
    """`boed demo --illness` takes a comma list like every other list flag (spaces still work)."""
    from xray.cli_base import comma_list

    p = subparser("boed", "demo")
    assert comma_list(p.parse_args(["--illness", "effusion,edema"]).illness) == ["effusion", "edema"]
    assert comma_list(p.parse_args(["--illness", "effusion", "edema"]).illness) == ["effusion", "edema"]
    assert comma_list(p.parse_args([]).illness) == ["effusion", "edema"]
    assert comma_list(" a, b ,,c ") == ["a", "b", "c"]
    assert "--illness LIST]" in p.format_usage() and "LIST [LIST ...]" not in p.format_help()


@pytest.mark.parametrize("script,command", COMMANDS)
def test_help_has_no_sphinx_markup(script, command):
    text = subparser(script, command).format_help()
    assert ":func:" not in text and ":class:" not in text and "``" not in text


def test_phantom_help_states_the_demo_prevalences_and_the_size_rule():
    from xray.phantom import DEMO_PREVALENCE

    p = subparser("xray", "phantom")
    text = expanded_help(p, p._option_string_actions["--demo-prevalence"])
    for name, share in DEMO_PREVALENCE.items():
        assert f"{name.lower()} {share:.0%}" in text
    assert "multiple of 4" in expanded_help(p, p._option_string_actions["--size"])


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_version_flag_and_attribute_agree_with_pyproject(script, capsys):
    import importlib
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert importlib.import_module(script).__version__ == version
    with pytest.raises(SystemExit) as e:
        SCRIPTS[script](["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"{script} {version}"
