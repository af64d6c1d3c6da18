"""Config: strict keys with suggestions, typed overrides, validation before any model loads."""

from pathlib import Path

import pytest
import yaml

from difftune.config import Config, ConfigError, load_config, reference_markdown, to_dict, validate

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_key_and_closest(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "train:\n  stesp: 10\n"))
    assert "'train.stesp'" in str(e.value) and "'train.steps'" in str(e.value)


def test_unknown_section_and_override_key(tmp_path):
    with pytest.raises(ConfigError, match="'trian'.*'train'"):
        load_config(write(tmp_path, "trian:\n  steps: 10\n"))
    with pytest.raises(ConfigError, match="'method.rnak'.*'method.rank'"):
        load_config(None, ["method.rnak=4"])


def test_overrides_are_typed():
    cfg = load_config(None, ["train.lr=1e-5", "train.steps=10", "train.gradient_checkpointing=true",
                             "validation.prompts=[a, 'b c']", "method.alpha=8", "data.concepts=[{dir: x}]",
                             "data.concepts.0.repeats=3"])
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 10 and cfg.train.gradient_checkpointing is True
    assert cfg.validation.prompts == ["a", "b c"]
    assert cfg.method.alpha == 8.0 and cfg.data.concepts[0].repeats == 3


def test_wrong_types_name_the_key():
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_config(None, ["train.steps=ten"])
    with pytest.raises(ConfigError, match="train.precision.*did you mean 'bf16'"):
        load_config(None, ["train.precision=bf61"])
    with pytest.raises(ConfigError, match="train.lr is a value, not a section"):
        load_config(None, ["train.lr.x=1"])


def test_yaml_no_means_the_string(tmp_path):
    # YAML 1.1 reads a bare `no` as false; the contract writes `precision: no`
    cfg = load_config(write(tmp_path, "train:\n  precision: no\n"))
    assert cfg.train.precision == "no"


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_validation_collects_problems(tmp_path):
    cfg = load_config(None, ["model.path=m", "output_dir=o", "method.rank=0", "data.resolution=100",
                             f"data.concepts=[{{dir: {tmp_path / 'missing'}}}]", "train.grad_accum=0"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, resolution_multiple=16)
    msg = str(e.value)
    assert "method.rank must be > 0" in msg
    assert "data.resolution 100 is not a multiple of 16" in msg and "try 96" in msg
    assert "folder not found" in msg and "missing" in msg
    assert "train.grad_accum must be >= 1" in msg


def test_concept_needs_exactly_one_source():
    cfg = load_config(None, ["model.path=m", "output_dir=o", "data.concepts=[{dir: a, hf: b}]"])
    with pytest.raises(ConfigError, match=r"concepts\[0\] needs exactly one of `dir` or `hf`"):
        validate(cfg, check_paths=False)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path, tmp_path):
    from difftune.families.registry import get_family

    cfg = load_config(path)
    family = cfg.model.family if cfg.model.family != "auto" else None
    # hub ids cannot be read offline: the multiple below is what the real models need
    multiple = 16 if (family == "flux" or "FLUX" in cfg.model.path) else 8
    validate(cfg, resolution_multiple=multiple, check_paths=False)
    if family:
        get_family(family).options_for(cfg)  # model.options fit the family
    # the resolved form written into output_dir loads back to the same config
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(saved) == cfg


def test_defaults_load():
    assert load_config(None, []) == Config()


def test_reference_lists_every_key():
    text = reference_markdown()
    for key in ["`model.path`", "`method.rank`", "`data.concepts[].caption_template`", "`train.grad_accum`",
                "`checkpoint.resume`", "`validation.prompts`", "`output_dir`"]:
        assert key in text


def test_readme_config_reference_is_current():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("<!-- config reference:")
    body = readme[readme.index("\n", start) + 1 : readme.index("<!-- end config reference -->")]
    assert body.strip() == reference_markdown().strip(), "run `difftune config reference` and paste it into README.md"


# ---- family options (model.options) ----------------------------------------------------------------


def test_old_family_keys_name_their_new_place(tmp_path):
    for old, new in [("model.prior", "model.options.prior"), ("model.decoder", "model.options.decoder"),
                     ("objective.guidance", "model.options.guidance"),
                     ("objective.max_sequence_length", "model.options.max_sequence_length")]:
        with pytest.raises(ConfigError, match=f"'{old}' is now '{new}'"):
            load_config(None, [f"{old}=2"])
        section, key = old.split(".")
        with pytest.raises(ConfigError, match=f"'{old}' is now '{new}'"):
            load_config(write(tmp_path, f"{section}:\n  {key}: x\n"))


def test_a_config_saved_before_the_options_moved_still_loads(tmp_path):
    """Checkpoints of older versions list every key with its default (model.prior: null, objective.guidance:
    1.0): those say nothing and are dropped, so such a run resumes; a value that was set still names the new key."""
    cfg = load_config(write(tmp_path, "model:\n  prior: null\n  decoder: null\nobjective:\n  guidance: 1.0\n"
                                      "  max_sequence_length: null\n"))
    assert cfg.model.options == {} or not cfg.model.options
    with pytest.raises(ConfigError, match="'model.prior' is now 'model.options.prior'"):
        load_config(write(tmp_path, "model:\n  prior: some/prior\n"))


def test_family_options_are_typed_and_strict():
    from difftune.families.registry import get_family

    flux = get_family("flux")
    cfg = load_config(None, ["model.options.guidance=3.5", "model.options.max_sequence_length=16"])
    options = flux.options_for(cfg)
    assert (options.guidance, options.max_sequence_length) == (3.5, 16)
    with pytest.raises(ConfigError, match=r"unknown config key 'model.options.guidanse'; did you mean 'model.options.guidance'"):
        flux.options_for(load_config(None, ["model.options.guidanse=3.5"]))
    with pytest.raises(ConfigError, match="model.options.guidance: expected a number"):
        flux.options_for(load_config(None, ["model.options.guidance=high"]))
    with pytest.raises(ConfigError, match="model.options.max_sequence_length must be between 1 and 512"):
        flux.options_for(load_config(None, ["model.options.max_sequence_length=600"]))
    # a family without options refuses any
    with pytest.raises(ConfigError, match="unknown config key 'model.options.prior'"):
        get_family("sd").options_for(load_config(None, ["model.options.prior=x"]))
    assert get_family("kandinsky22-decoder").options_for(load_config(None, ["model.options.prior=owner/prior"])).prior == "owner/prior"


def test_reference_lists_each_family_options():
    text = reference_markdown()
    assert "**model.options (flux)**" in text and "`model.options.guidance`" in text
    assert "**model.options (kandinsky22-decoder)**" in text and "`model.options.prior`" in text


def test_method_kind_comes_from_the_method_registry():
    from difftune.methods import method_kinds

    assert {"lora", "dora", "full"} <= set(method_kinds())
    assert load_config(None, ["method.kind=dora"]).method.kind == "dora"
    with pytest.raises(ConfigError, match=r"method.kind: 'lorra' is not one of .*did you mean 'lora'"):
        load_config(None, ["method.kind=lorra"])
    text = reference_markdown()
    assert all(f"| `{kind}` |" in text for kind in method_kinds())


def test_family_option_paths_follow_the_path_rule(tmp_path):
    """model.options keys a family declares as paths are resolved like model.path: relative to the
    config file's folder (or the current directory on the command line), and a missing local one is refused."""
    (tmp_path / "cfg" / "prior").mkdir(parents=True)
    (tmp_path / "cfg" / "c.yaml").write_text("model:\n  path: owner/decoder\n  options:\n    prior: ./prior\n")
    cfg = load_config(tmp_path / "cfg" / "c.yaml")
    assert cfg.model.options["prior"] == str(tmp_path / "cfg" / "prior")
    assert load_config(None, ["model.options.prior=owner/prior"]).model.options["prior"] == "owner/prior"
    cfg = load_config(tmp_path / "cfg" / "c.yaml", ["model.options.prior=./nope", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match=r"model.options.prior: not found: .*nope"):
        validate(cfg)
