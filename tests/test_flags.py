"""The llama.cpp flags are one definition: every command parses them alike, with the same
defaults and help (eval sizes the cache itself when -c is not given)."""
from __future__ import annotations

import pytest

from llamakv.cli import build_parser
from llamakv.errors import LlamaKVError
from llamakv.flags import llama_kwargs

COMMANDS = ["compress", "ask", "eval", "serve"]
FLAGS = ["-c", "-ngl", "-t", "-b", "-fa", "-ctk", "-ctv", "--rpc", "-sm", "-ts", "-mg"]


def parse(command: str, *flags: str):
    extra = {"ask": ["state.npz", "--question", "q"]}.get(command, [])
    return build_parser().parse_args([command, *extra, *flags])


def actions(command: str) -> dict:
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return {a.option_strings[0]: a for a in sub._actions if a.option_strings and a.option_strings[0] in FLAGS}


@pytest.mark.parametrize("command", COMMANDS)
def test_the_flags_parse_the_same_in_every_command(command):
    flags = ["-c", "2048", "-ngl", "7", "-t", "3", "-b", "256", "-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0",
             "--rpc", "10.0.0.2:50052,10.0.0.3:50052", "-sm", "row", "-ts", "3,1", "-mg", "1"]
    args, reference = parse(command, *flags), parse("compress", *flags)
    assert llama_kwargs(args) == llama_kwargs(reference)
    assert llama_kwargs(args)["flash_attn"] is True and llama_kwargs(args)["n_ctx"] == 2048
    assert parse(command, "-fa").flash_attn == "on" and parse(command, "-fa", "auto").flash_attn == "auto"
    kw = llama_kwargs(args)
    assert (kw["rpc_servers"], kw["split_mode"], kw["tensor_split"], kw["main_gpu"]) == (
        "10.0.0.2:50052,10.0.0.3:50052", "row", [3.0, 1.0], 1)
    assert llama_kwargs(parse(command, "-ts", "1/2"))["tensor_split"] == [1.0, 2.0]
    with pytest.raises(LlamaKVError, match="-ts"):
        llama_kwargs(parse(command, "-ts", "3,x"))


@pytest.mark.parametrize("command", COMMANDS[1:])
def test_the_same_defaults_and_help(command):
    mine, ref = actions(command), actions("compress")
    assert set(mine) == set(FLAGS)
    for flag in FLAGS:
        if command == "eval" and flag == "-c":
            assert mine[flag].default is None  # sized from the tasks
            continue
        assert (mine[flag].default, mine[flag].help, mine[flag].choices) == (ref[flag].default, ref[flag].help,
                                                                             ref[flag].choices), flag


def test_a_quantized_v_cache_without_flash_attention_is_refused_in_every_command():
    for command in COMMANDS:
        with pytest.raises(LlamaKVError, match="-fa on"):
            llama_kwargs(parse(command, "-ctv", "q8_0"))
