"""Config resolution, validation errors that name the field, and fingerprints."""

from __future__ import annotations

import pytest

from clips4.config import ConfigError, PipelineConfig, list_presets, parse_override, resolve_config, to_yaml
from clips4.tasks.stages import STAGES


def test_defaults_and_preset_sections() -> None:
    cfg = resolve_config("demo")
    assert cfg.name == "demo"
    assert cfg.data.dataset == "synthetic"
    assert cfg.teacher.train == "synthetic"
    for stage in STAGES:
        assert f"\n{stage}:" in "\n" + to_yaml(cfg)


def test_overrides_are_yaml_typed_and_nested() -> None:
    cfg = resolve_config("demo", overrides=["train.lr=0.02", "data.held_out=[kite, ring]", "cluster.num_unknown=3"])
    assert cfg.train.lr == 0.02
    assert cfg.data.held_out == ["kite", "ring"]
    assert cfg.cluster.num_unknown == 3
    assert resolve_config(overrides=["data.held_out=null"]).data.held_out is None


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.lr=abc", "train.lr"),
        ("train.lr=-1", "train.lr"),
        ("train.nonsense=1", "train.nonsense"),
        ("teacher.train=maybe", "teacher.train"),
        ("data.synthetic.image_size=3", "data.synthetic.image_size"),
        ("data.on_bad_input=ignore", "data.on_bad_input"),
        ("train.crop_scale=[2, 1]", "train"),
    ],
)
def test_bad_values_name_the_field(override: str, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config("demo", overrides=[override])
    assert named in str(info.value)


def test_malformed_override_preset_and_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_override("no-equals-sign")
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        resolve_config("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(config_file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        resolve_config(config_file=bad)
    with pytest.raises(ConfigError, match="train.lr"):
        resolve_config(overrides=["train.lr.x=1"])
    with pytest.raises(ConfigError, match="not a section"):
        resolve_config(overrides=["train.steps=3", "train.steps.x=1"])
    with pytest.raises(ConfigError, match="either a preset or a config file"):
        resolve_config("demo", config_file=bad)


def test_config_file_round_trip(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(to_yaml(resolve_config("demo", overrides=["train.steps=7"])))
    cfg = resolve_config(config_file=path)
    assert cfg.train.steps == 7
    assert "demo" in list_presets()


def test_fingerprint_stable_and_sensitive() -> None:
    a, b = PipelineConfig(), PipelineConfig()
    for stage in STAGES:
        assert a.stage(stage).fingerprint() == b.stage(stage).fingerprint()
    changed = resolve_config(overrides=["train.lr=0.5"])
    assert changed.train.fingerprint() != a.train.fingerprint()
    assert changed.data.fingerprint() == a.data.fingerprint()
    # Worker counts and devices change how a stage runs, not what it writes.
    assert resolve_config(overrides=["train.checkpoint_every=7", "train.device=cpu"]).train.fingerprint() == a.train.fingerprint()
    assert resolve_config(overrides=["features.batch_size=3"]).features.fingerprint() == a.features.fingerprint()
    # Nested sections count.
    assert resolve_config(overrides=["data.synthetic.seed=9"]).data.fingerprint() != a.data.fingerprint()


def test_configuration_reference_is_in_sync() -> None:
    from pathlib import Path

    from clips4.config import reference_markdown

    doc = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    assert doc.read_text() == reference_markdown(), "regenerate: clips4 config reference > docs/configuration.md"
    assert "`train.lr`" in doc.read_text() and "`data.synthetic.seed`" in doc.read_text()
