"""Every key of the trainer's config (and of pafm.eval's) has a declared range or set, checked at start-up.

The schema is walked, not listed, so a key added later without a declared rule fails here.  Each numeric key is
tried with 0, a negative, NaN, inf and a huge value, each enum with an unknown word: the value is either refused by
`pafm.train.main` in one line with exit code 2 naming the key, or accepted, and then a tiny run trains on it
in-process (about 0.3 s a run) and ends with finite, bounded losses.
"""
import dataclasses
import json
import math
import subprocess
import sys
from dataclasses import field
from typing import Literal, get_origin

import pytest

from pafm.config import ConfigError, load_config, non_null, schema, section, setting, within
from pafm.evaluation import EvalConfig
from pafm.objectives import ObjectiveConfig
from pafm.train import Config

from helpers import DIGITS, ROOT, TINY, run_in_process

NUMBERS = ["0", "-1", ".nan", ".inf"]
HUGE = {int: str(10**18), float: "1e300"}
# Accepted values that are meant: a negative, and huge values that are harmless (a slow warm-up, rare checkpoints,
# a flat posterior...).  A huge data.batch_size is refused at launch, against the dataset's size.
NEGATIVE_OK = {("log.sample_every", "-1"), ("objective.time_mean", "-1")}
HUGE_OK = {"train.steps", "train.seed", "train.max_bad_steps", "objective.target_ess", "checkpoint.every",
           "checkpoint.keep", "data.batch_size", "optim.warmup_steps", "optim.grad_clip", "log.every",
           "log.sample_every", "eval.every", "eval.seed", "eval.sampler.cfg_channels"}
# A seed is hashed; isc_splits and cfg_channels are checked against the samples and the export's channels (see
# tests/test_cli_errors.py), and the KID subset is capped at the samples.
EVAL_HUGE_OK = {"eval.seed", "eval.isc_splits", "eval.kid_subset_size", "sampler.cfg_channels"}
NOT_TRAINED = {("train.steps", HUGE[int])}  # accepted, but would train for 10^18 steps
# Keys of an optional section are probed with the section switched on: its required keys, and no network.
SECTION_ON = {"log.wandb.": ["log.wandb.project=probe", "log.wandb.mode=offline"]}


def probes(key) -> list[str]:
    """The override values tried for one key, as written on the command line."""
    tp = non_null(key.type)
    if tp in HUGE:
        return NUMBERS + [HUGE[tp]]
    if get_origin(tp) is tuple:  # each item in turn, the others at their defaults
        out = []
        for i in range(len(key.default)):
            for value in NUMBERS + [HUGE[float]]:
                items = [str(x) for x in key.default]
                items[i] = value
                out.append(f"[{', '.join(items)}]")
        return out
    if get_origin(tp) is Literal:
        return ["bogus"]
    if tp is bool:
        return ["maybe"]
    if tp is str:
        return ['""']
    if get_origin(tp) is list:
        return ['[""]']
    if tp is dict:
        return ["{depth: .nan}"]
    raise AssertionError(f"{key.name}: no probes for {tp}; add them here")


def assert_refused(code, err, key):
    assert code == 2 and len(err) == 1, (key, code, err)
    assert err[0].startswith(("config error: ", "error: ")) and key in err[0], (key, err)
    assert "Traceback" not in err[0]


@pytest.mark.parametrize("root, count", [(Config, 50), (EvalConfig, 25)])
def test_every_key_declares_what_it_allows(root, count):
    keys = schema(root)  # raises TypeError for a key without a rule or a section without @section
    assert len(keys) > count
    for key in keys:
        if key.default not in (None, dataclasses.MISSING):
            assert key.allowed.test(key.default), (key.name, key.default, key.allowed.text)


def test_a_key_without_a_rule_or_a_plain_section_fails_the_schema():
    @section("extra")
    class Extra:
        flag: bool = True
        level: Literal["a", "b"] = "a"
        ratio: float = 0.5  # no rule

    @section("")
    class Root:
        extra: Extra = field(default_factory=Extra)

    with pytest.raises(TypeError, match="config key extra.ratio declares no allowed values"):
        schema(Root)
    with pytest.raises(TypeError, match="config key extra.ratio"):
        Extra()

    @dataclasses.dataclass
    class Plain:
        ratio: float = setting(0.5, within(0, 1))

    @section("")
    class Root2:
        plain: Plain = field(default_factory=Plain)

    with pytest.raises(TypeError, match=r"plain \(Plain\) must be declared with @section\('plain'\)"):
        schema(Root2)


def test_every_value_of_the_schema_trains_or_is_refused_in_one_line(in_process, capsys, tmp_path):
    tried, trained = 0, 0
    for key in schema(Config):
        for value in probes(key):
            tried += 1
            override = f"{key.name}={value}"
            section_on = next((on for prefix, on in SECTION_ON.items() if key.name.startswith(prefix)), [])
            try:
                load_config(Config, DIGITS, [f"run.dir={tmp_path}", *TINY, *section_on, override])
            except ConfigError:
                refused = run_in_process(in_process, capsys, tmp_path / "refused", *section_on, override)
                assert_refused(*refused, key.name)
                assert not (tmp_path / "refused").exists()
                continue
            assert value not in (".nan", ".inf") and ".nan" not in value and ".inf" not in value, override
            assert not value.startswith("-") or (key.name, value) in NEGATIVE_OK, override
            assert value not in HUGE.values() or key.name in HUGE_OK, override
            if (key.name, value) in NOT_TRAINED:
                continue
            run_dir = tmp_path / f"run{tried}"
            code, err = run_in_process(in_process, capsys, run_dir, *section_on, override)
            if code == 2:  # refused at launch, where the rule needs the data
                assert_refused(code, err, key.name)
                continue
            assert code == 0, (override, err)
            losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            # PAFM's first steps are noisy (a flat posterior, as a huge target_ess gives, reaches ~400 at lr 1e-3
            # without warm-up); a flipped gradient or a NaN would not stay below this
            assert losses and all(math.isfinite(x) and x < 1000 for x in losses), (override, losses)
            assert (run_dir / "checkpoints" / "step_0000003").is_dir(), override
            trained += 1
    assert tried > 150 and trained > 25, (tried, trained)


def test_every_value_of_the_eval_schema_is_allowed_or_refused_naming_the_key():
    """pafm.eval's own config, through its loader (tests/test_cli_errors.py runs pafm.eval on refused values)."""
    for key in schema(EvalConfig):
        for value in probes(key):
            try:
                load_config(EvalConfig, None, [f"{key.name}={value}"])
            except ConfigError as err:
                assert key.name in str(err) and "\n" not in str(err), (key.name, value, err)
                continue
            assert ".nan" not in value and ".inf" not in value, (key.name, value)
            assert value not in HUGE.values() or key.name in EVAL_HUGE_OK, (key.name, value)


@pytest.mark.parametrize("override, line", [
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0: must be >= 0 (0 disables clipping)"),
    ("optim.min_lr=-1", "optim.min_lr=-1.0: must be >= 0"),
    ("optim.min_lr=0.5", "optim.min_lr=0.5: must be <= optim.lr=0.001"),
    ("data.batch_size=0", "data.batch_size=0: must be >= 1"),
    ("data.batch_size=-4", "data.batch_size=-4: must be >= 1"),
    ("data.num_workers=-1", "data.num_workers=-1: must be in [0, 256]"),
    ("optim.lr=-1e-3", "optim.lr=-0.001: must be in (0, 1]"),
    ("optim.lr=nan", "optim.lr=nan: must be a finite number in (0, 1]"),
    ("optim.lr=inf", "optim.lr=inf: must be a finite number in (0, 1]"),
    ("optim.betas=[2.0, 0.9]", "optim.betas=[2.0, 0.9]: must be a list whose every item is in [0, 1)"),
    ("optim.weight_decay=-1", "optim.weight_decay=-1.0: must be >= 0"),
    ("optim.weight_decay=5000", "optim.weight_decay=5000.0: must be < 1 / optim.lr=0.001"),
    ("optim.eps=-1", "optim.eps=-1.0: must be in (0, 1]"),
    ("optim.warmup_steps=-1", "optim.warmup_steps=-1: must be >= 0"),
    ("train.ema_decay=2", "train.ema_decay=2.0: must be in [0, 1)"),
    ("train.seed=-1", "train.seed=-1: must be in [0, "),
    ("objective.temperature=nan", "objective.temperature=nan: must be a finite number in (0, 1000000]"),
    ("objective.t_range=[0.6, 0.2]", "objective.t_range=[0.6, 0.2]: must be a pair [a, b] with 0 <= a <= b <= 1"),
    ("data.micro_batch_size=48", "data.micro_batch_size=48: must be a divisor of data.batch_size=128"),
    ("log.sample_cfg=-1", "log.sample_cfg=-1.0: must be in [0, 100]"),
    ("checkpoint.every=0", "checkpoint.every=0: must be >= 1 (steps between checkpoints)"),
])
def test_the_values_found_bad_are_refused_in_one_line(override, line, in_process, capsys, tmp_path):
    capsys.readouterr()
    assert in_process([DIGITS, f"run.dir={tmp_path / 'run'}", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"config error: {line}"), err
    assert not (tmp_path / "run").exists()


CAPTIONS = str(ROOT / "configs" / "digits_mmdit.yaml")


@pytest.mark.parametrize("config, overrides, words", [
    (DIGITS, ["model.name=SiT-B2"], ["unknown model 'SiT-B2'", "did you mean 'SiT-B/2'"]),
    (DIGITS, ["model.kwargs={depth: 1, hidden_size: 66, num_heads: 4}"], ["hidden_size 66", "num_heads 4"]),
    (CAPTIONS, ["objective.source=bank"], ["objective", "class labels"]),
    (CAPTIONS, ["objective.source=batch", "objective.text_prior=self"], ["text_prior=self", "FM's"]),
    (DIGITS, ["checkpoint.every=0"], ["checkpoint.every=0: must be >= 1"]),
    (DIGITS, ["train.steps=-5"], ["train.steps=-5: must be >= 1"]),
    (DIGITS, ["train.resume=/nowhere/step_0000004"], ["train.resume=/nowhere/step_0000004", "no such checkpoint"]),
])
def test_settings_wrong_for_this_model_or_data_are_refused_in_one_line(config, overrides, words, in_process, capsys,
                                                                        tmp_path):
    """Settings valid one by one but not with this model, dataset or run folder: refused before the first step."""
    capsys.readouterr()
    assert in_process([config, f"run.dir={tmp_path / 'run'}", *TINY, "train.steps=2", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(("config error: ", "error: ")), err
    assert all(word in err[0] for word in words), (words, err)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cuda_without_a_device_is_refused_in_one_line(in_process, capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert in_process([DIGITS, f"run.dir={tmp_path / 'run'}", "train.device=cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["config error: train.device=cuda: must be auto or cpu here: no CUDA device is visible"]


def test_a_huge_batch_is_refused_against_the_dataset(in_process, capsys, tmp_path):
    code, err = run_in_process(in_process, capsys, tmp_path / "run", "data.batch_size=100000")
    assert code == 2 and err == ["error: data.batch_size=100000: must be <= 1437, the training items of "
                                 "builtin:digits"], err


def test_objective_config_built_in_code_is_checked_too():
    with pytest.raises(ConfigError, match=r"objective.cond_dropout=1.0: must be in \[0, 1\)"):
        ObjectiveConfig(kind="pafm", cond_dropout=1.0)
    with pytest.raises(ConfigError, match="objective.target_ess=nan: must be a finite number >= 1"):
        ObjectiveConfig(kind="pafm", target_ess=float("nan"))
    assert ObjectiveConfig(kind="fm", target_ess=None).target_ess is None  # null where the type allows it


def test_config_error_is_printed_by_rank_0_only(in_process, capsys, monkeypatch, tmp_path):
    argv = [DIGITS, f"run.dir={tmp_path}", "optim.grad_clip=-1"]
    monkeypatch.setenv("RANK", "1")
    assert in_process(argv) == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert in_process(argv) == 2 and capsys.readouterr().err.count("config error") == 1


@pytest.mark.parametrize("text, words", [
    ("train:\n  steps: [1, 2\n  seed: 0\n", ["line 3, column 7", "expected ',' or ']'"]),
    ("train:\n\tsteps: 1\n", ["line 2, column 1", "found character '\\t'"]),
    ("run: {dir: x\n", ["line 2, column 1", "expected ',' or '}'"]),
])
def test_a_yaml_syntax_error_is_one_line_with_its_place(text, words, in_process, capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert in_process([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"config error: config file {path} is not valid YAML: "), err
    assert all(w in err[0] for w in words), (err, words)


def test_a_folder_given_as_the_config_says_so(in_process, capsys, tmp_path):
    assert in_process([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"config error: config file {tmp_path} is a folder; give the YAML file in it\n"


def test_an_unreadable_config_is_one_line(in_process, capsys, tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00run: 1")
    assert in_process([str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"config error: config file {path} cannot be read: "), err


@pytest.mark.slow
def test_config_error_is_printed_once_under_torchrun(env, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pafm.train",
           DIGITS, f"run.dir={tmp_path / 'run'}", "optim.grad_clip=-1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if "config error" in line]
    assert ours == ["config error: optim.grad_clip=-1.0: must be >= 0 (0 disables clipping)"], proc.stderr


def test_error_lines_carry_no_escape_codes(capsys):
    from pafm.cli import report_error

    assert report_error(ValueError("\x1b[31mno such file\x1b[0m: /data/\x1b[1mx\x1b[0m\n  more")) == 2
    assert capsys.readouterr().err == "error: no such file: /data/x more\n"
