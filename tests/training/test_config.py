"""TrainConfig: flags and config-file keys generated from the dataclass, precedence, validation."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from moetune.training.config import TrainConfig, add_arguments, field_docs, resolve_config


def parse(*argv) -> dict:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return vars(parser.parse_args(list(argv)))


def test_every_field_has_a_docstring_and_a_flag_with_it_as_help():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = " ".join(parser.format_help().split())
    for field in dataclasses.fields(TrainConfig):
        assert field_docs()[field.name], field.name
        assert "--" + field.name.replace("_", "-") in text
    assert " ".join(field_docs()["max_seq_length"].split()) in text


def test_only_given_flags_are_set_so_config_files_can_fill_the_rest():
    assert parse() == {}
    assert parse("--max-steps", "7", "--packing", "--target-modules", "q_proj", "down_proj") == {
        "max_steps": 7, "packing": True, "target_modules": ["q_proj", "down_proj"],
    }


@pytest.mark.parametrize(
    "name, text",
    [
        ("run.yaml", "max_steps: 4\nlr: 0.01\nbatch-size: 2\ntarget_modules: [q_proj, v_proj]\npacking: true\n"),
        ("run.toml", 'max_steps = 4\nlr = 0.01\nbatch-size = 2\ntarget_modules = ["q_proj", "v_proj"]\npacking = true\n'),
    ],
)
def test_config_file_then_flags_override(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    config = resolve_config({"lr": 0.5}, str(path))
    assert config.max_steps == 4 and config.batch_size == 2 and config.packing is True
    assert config.target_modules == ("q_proj", "v_proj")
    assert config.lr == 0.5  # the flag wins over the file
    assert config.r == TrainConfig().r  # untouched fields keep their defaults


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("a.yaml", "max_stepz: 3\n", "unknown key 'max_stepz'"),
        ("a.yaml", "max_steps: three\n", "max_steps: expected an integer"),
        ("a.yaml", "packing: 1\n", "packing: expected true or false"),
        ("a.yaml", "- 1\n- 2\n", "must hold a mapping"),
        ("a.toml", "max_steps = \n", "is not valid TOML"),
        ("a.yaml", "a: [1,\n", "is not valid YAML"),
        ("a.json", "{}", "expected a .yaml, .yml or .toml file"),
        ("a.yaml", "batch_size: 0\n", "--batch-size: expected an integer >= 1"),
        ("a.yaml", "checkpoint_layers: most\n", "checkpoint_layers: expected an integer, auto or all, got 'most'"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        resolve_config({}, str(path))


def test_missing_config_file():
    with pytest.raises(ValueError, match="--config: cannot read"):
        resolve_config({}, "/no/such/run.yaml")


def test_checkpoint_layers_auto_from_a_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("checkpoint_layers: auto\n")
    assert resolve_config({}, str(path)).checkpoint_layers == "auto"
    path.write_text("checkpoint_layers: 3\n")
    assert resolve_config({}, str(path)).checkpoint_layers == 3
    path.write_text('checkpoint_layers: "3"\n')  # as the flag takes it
    assert resolve_config({}, str(path)).checkpoint_layers == 3
    path.write_text("checkpoint_layers: all\n")
    assert resolve_config({}, str(path)).checkpoint_layers is None


def test_yaml_exponent_numbers_are_numbers(tmp_path):
    """PyYAML reads YAML 1.1, where 2e-4 (the README's learning rate) is a string and only 2.0e-4 a float."""
    path = tmp_path / "run.yaml"
    path.write_text("lr: 2e-4\nweight_decay: 1E-2\nlora_alpha: 16\n")
    config = resolve_config({}, str(path))
    assert (config.lr, config.weight_decay, config.lora_alpha) == (2e-4, 1e-2, 16.0)
    path.write_text("lr: fast\n")
    with pytest.raises(ValueError, match=f"--config: {path}: lr: expected a number, got 'fast'"):
        resolve_config({}, str(path))
