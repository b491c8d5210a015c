"""Template rendering (pure logic): no user option key or value can add or change YAML
structure; reserved names, schema, StrictUndefined, high_assurance, allowed_functions."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import templates
from broker.refusal import Refused

ROOT = Path(__file__).resolve().parent.parent

TEMPLATE = """\
engine:
  type: ThreadPoolEngine
  max_workers: {{ max_workers | default(1) }}
worker_init: {{ worker_init | default("") }}
labels:
{%- for k, v in labels.items() %}
  {{ k }}: {{ v }}
{%- endfor %}
partition: {{ provider.partition }}
as_text: {{ provider }}
setup: {{ cmd | shell_escape }}
"""
IDENTITY = {"local": {"uname": "jessica", "uid": 1234}, "globus": {"id": "abc"}}
INJECTIONS = ["a\nb: c", "x: y", "{a: b}", "- item", "&anchor", "*anchor", "!!python/object:os.system", "{{ 7*7 }}",
              "'quoted'", '"dq"', "#comment", "| block", "> folded", "\\", "\x85nel", "key: [1, 2]", "?", "%TAG"]


def render(tmp_path, template=TEMPLATE, schema=None, high_assurance=False, allowed_functions=None, **opts):
    t = tmp_path / "user_config_template.yaml.j2"
    t.write_text(template)
    s = tmp_path / "user_config_schema.json"
    if schema is not None:
        s.write_text(json.dumps(schema))
    elif s.exists():
        s.unlink()
    base = {"labels": {}, "provider": {"partition": "debug"}, "cmd": "echo hi"}
    return templates.render(t, s, user_opts={**base, **opts}, user_runtime={}, mapped_identity=IDENTITY,
                            parent_config={}, high_assurance=high_assurance, allowed_functions=allowed_functions)


def structure(config: dict):
    return {k: sorted(v) if isinstance(v, dict) else type(v).__name__ for k, v in config.items()}


@pytest.mark.parametrize("evil", INJECTIONS)
def test_values_and_keys_cannot_change_structure(tmp_path, evil):
    benign = render(tmp_path, worker_init="ok", labels={"team": "x"}, provider={"partition": "p"}, cmd="c").config
    got = render(tmp_path, worker_init=evil, labels={evil: evil}, provider={"partition": evil}, cmd=evil).config
    assert set(got) == set(benign)
    assert got["worker_init"] == evil and got["partition"] == evil
    assert got["labels"] == {evil: evil}  # the key arrives as a quoted key, verbatim
    assert got["engine"] == {"type": "ThreadPoolEngine", "max_workers": 1}
    assert got["as_text"] == {"partition": evil}  # a whole mapping prints as JSON flow, keys quoted


@settings(max_examples=150, deadline=None)
@given(value=st.text(max_size=40), key=st.text(min_size=1, max_size=20))
def test_any_text_round_trips_as_data(tmp_path_factory, value, key):
    tmp_path = tmp_path_factory.mktemp("t")
    got = render(tmp_path, worker_init=value, labels={key: value}).config
    assert sorted(got) == ["as_text", "engine", "labels", "partition", "setup", "worker_init"]
    assert got["worker_init"] == value and got["labels"] == {key: value}


def test_shell_escape_filter_quotes_for_a_shell(tmp_path):
    got = render(tmp_path, cmd="x; rm -rf ~").config
    assert got["setup"] == "'x; rm -rf ~'"


@pytest.mark.parametrize("name", ["_GC", "parent_config", "user_runtime", "mapped_identity"])
def test_reserved_names_are_refused(tmp_path, name):
    with pytest.raises(Refused, match=f"'{name}' is a reserved word"):
        render(tmp_path, **{name: "x"})


@pytest.mark.parametrize("name", ["a-b", "1x", "a b", "a\nb: c", "x" * 65])
def test_top_level_names_must_be_identifiers(tmp_path, name):
    with pytest.raises(Refused, match="is not allowed"):
        render(tmp_path, **{name: "v"})


def test_schema_validation_and_additional_properties(tmp_path):
    schema = {"type": "object", "properties": {"max_workers": {"type": "integer", "maximum": 4}},
              "additionalProperties": True}
    assert render(tmp_path, schema=schema, max_workers=2, extra="fine").config["engine"]["max_workers"] == 2
    with pytest.raises(Refused, match="max_workers is invalid: 9 is greater than the maximum of 4"):
        render(tmp_path, schema=schema, max_workers=9)
    closed = dict(schema, additionalProperties=False)
    with pytest.raises(Refused, match="Additional properties are not allowed"):
        render(tmp_path, schema=closed, extra="no")


def test_broken_schema_is_an_admin_error(tmp_path):
    with pytest.raises(Refused) as e:
        render(tmp_path, schema={"type": "no-such-type"})
    assert "contact the endpoint administrator" in e.value.user_message
    assert "not a valid JSON schema" in str(e.value)


def test_missing_option_is_reported_by_name(tmp_path):
    with pytest.raises(Refused, match="missing required user config option: 'account' is undefined"):
        render(tmp_path, template="engine: {type: x}\naccount: {{ account }}\n")


def test_sandbox_blocks_python_internals(tmp_path):
    with pytest.raises(Refused) as e:
        render(tmp_path, template="x: {{ ''.__class__.__mro__[1].__subclasses__() }}\n")
    assert "not allowed" in e.value.user_message


def test_high_assurance_is_set_by_the_mep_only(tmp_path):
    with pytest.raises(Refused, match="`high_assurance` may not be specified"):
        render(tmp_path, template="high_assurance: false\nengine: {type: x}\n")
    got = render(tmp_path, template="engine: {type: x}\n", high_assurance=True)
    assert got.text.startswith("high_assurance: true\n") and got.config["high_assurance"] is True


def test_mep_allowed_functions_override_the_template(tmp_path):
    mine = ["00000000-0000-0000-0000-000000000001"]
    got = render(tmp_path, template="engine: {type: x}\nallowed_functions: [a, b]\n", allowed_functions=mine)
    assert yaml.safe_load(got.text)["allowed_functions"] == mine and got.overrides


def test_rendered_config_must_be_a_mapping(tmp_path):
    with pytest.raises(Refused, match="not a mapping"):
        render(tmp_path, template="- just\n- a list\n")


def test_reserved_variables_reach_the_template(tmp_path):
    got = render(tmp_path, template="engine: {type: x}\nwho: {{ _GC.mapped_identity.local.uname }}\n"
                 "who2: {{ mapped_identity.globus.id }}\n")
    assert got.config["who"] == "jessica" and got.config["who2"] == "abc"


def test_debug_lines_use_the_seed_sentinels():
    lines = templates.debug_lines("a: 1\nb: 2")
    assert lines[0] == "Begin Compute endpoint configuration (2 lines):"
    assert lines[1:3] == ["  | a: 1", "  | b: 2"] and lines[-1] == "End Compute endpoint configuration"


def test_default_template_of_configure_renders_without_options(tmp_path):
    """The template `mepctl configure` writes runs with no options and no scheduler: the
    seed's "basic working" GlobusComputeEngine with a LocalProvider on the loopback, as the
    pinned UEP's own parser reads it."""
    from broker import seed
    (tmp_path / "t.j2").write_text(seed.USER_CONFIG_TEMPLATE)
    (tmp_path / "s.json").write_text(seed.USER_CONFIG_SCHEMA)
    got = templates.render(tmp_path / "t.j2", tmp_path / "s.json", user_opts={}, user_runtime={},
                           mapped_identity=IDENTITY, parent_config={}, high_assurance=False, allowed_functions=None)
    assert got.config["engine"]["type"] == "GlobusComputeEngine"
    assert got.config["engine"]["provider"]["type"] == "LocalProvider" and got.config["engine"]["address"] == "127.0.0.1"
    out = subprocess.run([UEP_PYTHON, "-I", "-c", CHECK_WITH_UEP], input=got.text, capture_output=True, text=True)
    assert out.stdout.split() == ["UserEndpointConfig", "GlobusComputeEngine", "LocalProvider"], out.stderr[-2000:]


UEP_PYTHON = "/opt/mep/uep-venv/bin/python3"  # the pinned globus-compute-endpoint (scripts/setup.sh)
CHECK_WITH_UEP = """
import sys
from globus_compute_endpoint.endpoint.config.utils import load_config_yaml
config = load_config_yaml(sys.stdin.read())
engine = config.engine
print(type(config).__name__, type(engine).__name__, type(engine.executor.provider).__name__)
"""


@pytest.mark.parametrize("opts, provider", [({"scheduler": "slurm", "partition": "short", "nodes": 2}, "SlurmProvider"),
                                            ({"scheduler": "pbs", "queue": "batch", "walltime": "01:00:00"},
                                             "PBSProProvider")])
def test_the_cluster_example_template_renders_a_config_the_real_uep_accepts(opts, provider):
    """docs/examples: Slurm and PBS settings, rendered by the broker, loaded by the pinned UEP's own parser."""
    examples = ROOT / "docs" / "examples"
    rendered = templates.render(examples / "user_config_template.hpc.yaml.j2", examples / "user_config_schema.hpc.json",
                                user_opts=opts, user_runtime={}, mapped_identity=IDENTITY, parent_config={},
                                high_assurance=False, allowed_functions=None)
    out = subprocess.run([UEP_PYTHON, "-I", "-c", CHECK_WITH_UEP], input=rendered.text, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["UserEndpointConfig", "GlobusComputeEngine", provider]
    with pytest.raises(Refused, match="partition is invalid"):
        templates.render(examples / "user_config_template.hpc.yaml.j2", examples / "user_config_schema.hpc.json",
                         user_opts={**opts, "partition": "x; rm -rf /"}, user_runtime={}, mapped_identity=IDENTITY,
                         parent_config={}, high_assurance=False, allowed_functions=None)


CHECK_BATCH_WITH_UEP = """
import json, sys
from globus_compute_endpoint.endpoint.config.utils import load_config_yaml
config = load_config_yaml(sys.stdin.read())
engine = config.engine
provider = engine.executor.provider
print(json.dumps({"config": type(config).__name__, "engine": type(engine).__name__,
                  "provider": type(provider).__name__, "launcher": type(provider.launcher).__name__,
                  "queue": getattr(provider, "partition", None) or getattr(provider, "queue", None),
                  "account": provider.account, "nodes_per_block": provider.nodes_per_block,
                  "walltime": provider.walltime, "worker_init": provider.worker_init.strip(),
                  "max_idletime": engine._job_status_kwargs["max_idletime"],
                  "blocks": [provider.init_blocks, provider.min_blocks, provider.max_blocks],
                  "display_name": config.display_name}))
"""


def render_example(kind: str, opts: dict) -> templates.Rendered:
    examples = ROOT / "docs" / "examples"
    return templates.render(examples / f"user_config_template.{kind}.yaml.j2", examples / f"user_config_schema.{kind}.json",
                            user_opts=opts, user_runtime={}, mapped_identity=IDENTITY, parent_config={},
                            high_assurance=False, allowed_functions=None)


def load_with_uep(text: str) -> dict:
    out = subprocess.run([UEP_PYTHON, "-I", "-c", CHECK_BATCH_WITH_UEP], input=text, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("kind, opts, expect", [
    ("slurm", {"ACCOUNT_ID": "proj-7"},
     {"provider": "SlurmProvider", "launcher": "SimpleLauncher", "queue": "debug", "account": "proj-7",
      "nodes_per_block": 1, "walltime": "00:30:00", "worker_init": "", "max_idletime": 30,
      "display_name": "Slurm - user jobs on the debug partition"}),
    ("slurm", {"ACCOUNT_ID": "proj-7", "PARTITION": "short", "NODES_PER_BLOCK": 2, "WALLTIME": "01:00:00",
               "WORKER_INIT_COMMAND": "module load x; source activate 'env'", "MAX_IDLETIME": 5},
     {"provider": "SlurmProvider", "queue": "short", "nodes_per_block": 2, "walltime": "01:00:00",
      "worker_init": "module load x; source activate 'env'", "max_idletime": 5,
      "display_name": 'Slurm - user jobs on the "short" partition'}),
    ("pbs", {"ACCOUNT_ID": "user_allocation_account_id", "NODES_PER_BLOCK": 2},
     {"provider": "PBSProProvider", "launcher": "MpiExecLauncher", "queue": "debug-scaling",
      "account": "user_allocation_account_id", "nodes_per_block": 2, "walltime": "1:00:00", "max_idletime": 30,
      "display_name": "Polaris at ALCF - debug-scaling queue"}),
])
def test_the_batch_examples_render_configs_the_real_uep_accepts(kind, opts, expect):
    """docs/examples' Slurm and PBS templates (the seed's Polaris form): rendered by the
    broker, then parsed by the pinned UEP's own config parser, every user value in place."""
    text = render_example(kind, opts).text
    # the parser resolves the interface's address: Polaris's bond0 is not on this machine
    got = load_with_uep(text.replace("ifname: bond0", "ifname: lo"))
    assert got["config"] == "UserEndpointConfig" and got["engine"] == "GlobusComputeEngine"
    assert got["blocks"] == [0, 0, 1]
    assert {k: got[k] for k in expect} == expect


@pytest.mark.parametrize("kind", ["slurm", "pbs"])
def test_the_batch_examples_require_an_account_and_refuse_bad_values(kind):
    with pytest.raises(Refused, match="'ACCOUNT_ID' is a required property"):
        render_example(kind, {})
    with pytest.raises(Refused, match="ACCOUNT_ID is invalid"):
        render_example(kind, {"ACCOUNT_ID": "a\nb: c"})
    with pytest.raises(Refused, match="NODES_PER_BLOCK is invalid"):
        render_example(kind, {"ACCOUNT_ID": "p", "NODES_PER_BLOCK": 0})
    with pytest.raises(Refused, match="Additional properties are not allowed"):
        render_example(kind, {"ACCOUNT_ID": "p", "queue": "other"})
