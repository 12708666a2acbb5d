"""The reachability check before a download: never a hang, and it asks the right host."""

from __future__ import annotations

import socket
import threading

import pytest

from pneumoscan import net
from pneumoscan.errors import PneumoscanError


def test_a_resolver_that_never_answers_is_not_waited_for(monkeypatch):
    # A socket timeout does not bound the name lookup: a broken resolver used to hang here.
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(30)
        raise OSError("answered too late")

    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(net, "CONNECT_TIMEOUT_S", 0.05)
    try:
        with pytest.raises(PneumoscanError, match="no answer in time.*--pretrained PATH"):
            net.require_network("huggingface.co", what="weights", instead="--pretrained PATH")
    finally:
        release.set()


@pytest.mark.parametrize("env, expected", [
    ({}, ("huggingface.co", 443)),
    ({"HF_ENDPOINT": "https://hf-mirror.example:8443"}, ("hf-mirror.example", 8443)),
    ({"HTTPS_PROXY": "http://proxy.example:3128"}, ("proxy.example", 3128)),
])
def test_the_host_checked_is_the_one_the_download_would_reach(monkeypatch, env, expected):
    for name in ("HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
                 "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    asked = []

    class Connection:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def connect(address, timeout):
        asked.append(address)
        return Connection()

    monkeypatch.setattr(socket, "create_connection", connect)
    net.require_network("huggingface.co", what="weights", instead="--pretrained PATH")
    assert asked == [expected]


@pytest.mark.parametrize("env, expected", [
    ({"HTTPS_PROXY": "http://proxy.example:abc"}, ("huggingface.co", 443)),  # mistyped port
    ({"HF_ENDPOINT": "https://hf-mirror.example:99999"}, ("huggingface.co", 443)),
    ({"HTTPS_PROXY": "https://proxy.example"}, ("proxy.example", 443)),  # https's own port
])
def test_a_mistyped_variable_costs_the_check_not_a_crash(monkeypatch, env, expected):
    for name in ("HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert net._where_it_connects("huggingface.co", 443) == expected
