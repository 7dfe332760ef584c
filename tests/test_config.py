"""Tests of run-config resolution (``distflow.config``)."""
from __future__ import annotations

import pytest

from distflow.config import (ConfigError, FaultConfig, RunConfig, TransportConfig,
                             parse_overrides, resolve)
from distflow.dag import Pipeline, Stage

pytestmark = pytest.mark.timeout(120)


def fn(ctx, **inputs):
    return {}


def make(params=None, defaults=None) -> Pipeline:
    return Pipeline("demo", [Stage("load", fn, outputs=["x"]), Stage("use", fn, inputs=["x"])],
                    params=params or {}, defaults=defaults or {})


# ------------------------------------------------------------------ precedence

def test_builtin_defaults():
    cfg = resolve(make(), {})
    assert isinstance(cfg, RunConfig)
    assert (cfg.steps, cfg.seed, cfg.placement, cfg.routing, cfg.out) == (10, 0, "colocated", "p2p", "")
    assert cfg.groups == {} and cfg.params == {}
    assert cfg.transport == TransportConfig() and cfg.fault == FaultConfig()


def test_pipeline_defaults_beat_builtin():
    cfg = resolve(make(defaults={"steps": 3, "placement": "split", "groups.train": 2}), {})
    assert cfg.steps == 3 and cfg.placement == "split" and cfg.groups == {"train": 2}
    assert cfg.seed == 0


def test_cli_beats_pipeline_defaults():
    p = make(params={"lr": 1e-3}, defaults={"steps": 3, "seed": 7, "groups.train": 2,
                                            "lr": 0.5, "transport.window": 4})
    cfg = resolve(p, {"steps": "5", "groups.train": "3", "lr": "0.25", "transport.window": "6"})
    assert cfg.steps == 5 and cfg.seed == 7
    assert cfg.groups == {"train": 3}
    assert cfg.params == {"lr": 0.25}
    assert cfg.transport.window == 6


def test_params_default_from_pipeline_and_not_mutated():
    params = {"lr": 1e-3, "batch": 8}
    p = make(params=params)
    cfg = resolve(p, {"batch": "16"})
    assert cfg.params == {"lr": 1e-3, "batch": 16}
    assert p.params == {"lr": 1e-3, "batch": 8}
    assert resolve(p, {}).params == {"lr": 1e-3, "batch": 8}


def test_resolve_cli_through_parse_overrides():
    cfg = resolve(make(), parse_overrides(["steps=4", " routing = hub ", "out=runs/x=1"]))
    assert cfg.steps == 4 and cfg.routing == "hub" and cfg.out == "runs/x=1"


# ------------------------------------------------------------------ coercion

def test_coercion_int_float_bool_str():
    p = make(params={"n": 1, "lr": 0.1, "flag": False, "name": "x"})
    cfg = resolve(p, {"n": "12", "lr": "3", "flag": "true", "name": "42",
                      "seed": "-2", "transport.heartbeat_s": "1"})
    assert cfg.params == {"n": 12, "lr": 3.0, "flag": True, "name": "42"}
    assert type(cfg.params["n"]) is int and type(cfg.params["lr"]) is float
    assert type(cfg.params["flag"]) is bool
    assert cfg.seed == -2
    assert cfg.transport.heartbeat_s == 1.0 and type(cfg.transport.heartbeat_s) is float


@pytest.mark.parametrize("raw,value", [("1", True), ("0", False), ("TRUE", True), ("False", False),
                                       ("yes", True), ("No", False)])
def test_bool_spellings(raw, value):
    assert resolve(make(params={"flag": False}), {"flag": raw}).params["flag"] is value


@pytest.mark.parametrize("key,raw,kind", [("flag", "maybe", "bool"), ("n", "1.5", "int"),
                                          ("lr", "fast", "float"), ("steps", "ten", "int"),
                                          ("transport.window", "2.0", "int"),
                                          ("fault.rank", "x", "int")])
def test_bad_values_name_key_and_type(key, raw, kind):
    p = make(params={"flag": True, "n": 1, "lr": 0.1})
    with pytest.raises(ConfigError, match=rf"^{key}='{raw}': expected {kind}$"):
        resolve(p, {key: raw})


def test_non_string_values_pass_through():
    cfg = resolve(make(defaults={"steps": 2, "transport.peer_timeout_s": 30}), {})
    assert cfg.steps == 2 and cfg.transport.peer_timeout_s == 30


def test_group_sizes_and_aliases():
    cfg = resolve(make(), {"groups.a": "2", "groups.b": "a", "groups.c": "-1"})
    assert cfg.groups == {"a": 2, "b": "a", "c": -1}


# ------------------------------------------------------------------ nested keys

def test_transport_and_fault_keys():
    cfg = resolve(make(), {"transport.heartbeat_s": "0.25", "transport.peer_timeout_s": "5",
                           "transport.recv_timeout_s": "60", "transport.window": "3",
                           "transport.max_message_mb": "64", "fault.rank": "1",
                           "fault.step": "2", "fault.stage": "use", "fault.mode": "raise"})
    assert cfg.transport == TransportConfig(heartbeat_s=0.25, peer_timeout_s=5.0,
                                            recv_timeout_s=60.0, window=3, max_message_mb=64.0)
    assert cfg.fault == FaultConfig(rank=1, step=2, stage="use", mode="raise")
    d = cfg.to_dict()
    assert d["transport"]["window"] == 3 and d["fault"]["stage"] == "use"


@pytest.mark.parametrize("key,section", [("transport.bogus", "transport"), ("fault.when", "fault")])
def test_unknown_nested_key_lists_section_keys(key, section):
    with pytest.raises(ConfigError, match=rf"unknown key '{key}'; {section}\.\* keys: \[") as info:
        resolve(make(), {key: "1"})
    known = ["encrypt", "heartbeat_s", "ipc", "keep_large_buffers", "max_message_mb",
             "max_pending_mb", "peer_all_reduce_mb", "peer_timeout_s", "recv_timeout_s",
             "secret_file", "window"] \
        if section == "transport" else ["mode", "rank", "stage", "step"]
    assert str(known) in str(info.value)


def test_fault_mode_validated():
    with pytest.raises(ConfigError, match=r"fault.mode must be 'kill' or 'raise', got 'boom'"):
        resolve(make(), {"fault.mode": "boom"})


# ------------------------------------------------------------------ unknown keys

@pytest.mark.parametrize("key", ["stepz", "groups", "params", "transport", "fault", "groupsx.a"])
def test_unknown_key_lists_known_keys(key):
    p = make(params={"lr": 0.1, "batch": 4})
    with pytest.raises(ConfigError, match=rf"unknown config key '{key}' for pipeline 'demo'") as info:
        resolve(p, {key: "1"})
    msg = str(info.value)
    for k in ("steps", "out", "seed", "placement", "routing", "lr", "batch",
              "groups.<name>", "transport.*", "fault.*"):
        assert k in msg, (k, msg)


def test_unknown_key_in_pipeline_defaults_fails_too():
    with pytest.raises(ConfigError, match="unknown config key 'stpes'"):
        resolve(make(defaults={"stpes": 3}), {})


# ------------------------------------------------------------------ invalid values

@pytest.mark.parametrize("overrides,pattern", [
    ({"steps": "0"}, r"steps must be >= 1, got 0"),
    ({"steps": "-4"}, r"steps must be >= 1, got -4"),
    ({"transport.window": "0"}, r"transport.window must be >= 1, got 0"),
    ({"transport.heartbeat_s": "10"},
     r"need 0 < transport.heartbeat_s \(10.0\) < transport.peer_timeout_s \(10.0\)"),
    ({"transport.heartbeat_s": "3", "transport.peer_timeout_s": "2"},
     r"transport.heartbeat_s \(3.0\) < transport.peer_timeout_s \(2.0\)"),
    ({"transport.heartbeat_s": "0"}, r"need 0 < transport.heartbeat_s \(0.0\)"),
    ({"transport.recv_timeout_s": "0"}, r"recv_timeout_s and transport.max_message_mb must be > 0"),
    ({"transport.max_message_mb": "-1"}, r"recv_timeout_s and transport.max_message_mb must be > 0"),
    ({"routing": "bogus"}, r"routing must be 'p2p' or 'hub', got 'bogus'"),
    ({"transport.max_pending_mb": "0"}, r"transport.max_pending_mb must be > 0, got 0.0"),
])
def test_invalid_values(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        resolve(make(), overrides)
    assert isinstance(info.value, ValueError)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------ parse_overrides

def test_parse_overrides():
    assert parse_overrides([]) == {}
    assert parse_overrides(["a=1", " b = two ", "c=", "d=x=y", "a=3"]) == \
        {"a": "3", "b": "two", "c": "", "d": "x=y"}


@pytest.mark.parametrize("arg", ["steps", "=5", "", "--steps"])
def test_parse_overrides_rejects_non_key_value(arg):
    with pytest.raises(ConfigError, match=rf"argument '{arg}' is not key=value"):
        parse_overrides(["steps=1", arg])
