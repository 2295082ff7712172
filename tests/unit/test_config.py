"""The configuration file: every error names the file, the line and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastsocks import config
from fastsocks.errors import ConfigError
from fastsocks.settings import ListenAddress, Settings

EXAMPLE = Path(config.__file__).with_name("fastsocks.example.toml")


def load_text(tmp_path: Path, text: str, overrides: dict | None = None) -> Settings:
    path = tmp_path / "fastsocks.toml"
    path.write_text(text)
    return config.load(path, overrides)


def error_of(tmp_path: Path, text: str, overrides: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, overrides)
    return str(info.value).replace(str(tmp_path) + "/", "")


def test_the_shipped_example_loads_and_means_what_its_comments_say():
    settings = config.load(EXAMPLE)
    assert settings.listen == (ListenAddress("127.0.0.1", 1080),)
    assert settings.methods == ("none",)
    assert not settings.policy.default_allow
    assert [r.action for r in settings.policy.rules] == ["deny", "allow", "deny", "allow"]
    assert settings.policy.rules[0].origin == f"{EXAMPLE}:{_line_of(EXAMPLE, '[[rules]]', 1)}"


def _line_of(path: Path, text: str, nth: int) -> int:
    seen = 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip() == text:
            seen += 1
            if seen == nth:
                return number
    raise AssertionError(text)


def test_values_reach_the_settings(tmp_path):
    s = load_text(tmp_path, """
[server]
listen = "[::1]:1081"
workers = 3
[timeouts]
handshake_s = 2
[limits]
max_sessions_per_client = 5
[auth]
users_file = "users.txt"
methods = ["userpass", "none"]
""")
    assert s.listen == (ListenAddress("::1", 1081),) and s.workers == 3
    assert s.handshake_timeout_s == 2.0 and s.max_sessions_per_client == 5
    assert s.users_file == str(tmp_path / "users.txt")  # relative to the file
    assert s.methods == ("userpass", "none")


def test_flags_override_the_file(tmp_path):
    s = load_text(tmp_path, "[server]\nworkers = 3\n[timeouts]\nidle_s = 5\n", {"workers": 1})
    assert s.workers == 1 and s.idle_timeout_s == 5.0


@pytest.mark.parametrize("text, message", [
    ("[server]\nworkers = 0\n", "fastsocks.toml:2: server.workers: expected 1-1024"),
    ("[server]\n\nworkers = true\n", "fastsocks.toml:3: server.workers: expected an integer, not true/false"),
    ("[sever]\nworkers = 1\n", "fastsocks.toml:1: sever: unknown table"),
    ("[server]\nworker = 1\n", "fastsocks.toml:2: server.worker: unknown key; expected one of accept_mode"),
    ("[server]\nlisten = [\"localhost:1080\"]\n", "fastsocks.toml:2: server.listen: 'localhost:1080': the host must be an IP address"),
    ("[timeouts]\nhandshake_s = -1\n", "fastsocks.toml:2: timeouts.handshake_s: expected a number of seconds > 0"),
    ("[timeouts]\nhandshake_s = \"10\"\n", "fastsocks.toml:2: timeouts.handshake_s: expected a number, not a string"),
    ("[auth]\nmethods = [\"password\"]\n", "fastsocks.toml:2: auth.methods: expected a list of 'none' and/or 'userpass'"),
    ("[auth]\nmethods = [\"userpass\"]\n", "fastsocks.toml:2: auth.methods: userpass needs a users file"),
    ("[limits]\nmax_sessions = -3\n", "fastsocks.toml:2: limits.max_sessions: expected >= 0 (0: no cap)"),
    ("[limits]\nrate_down_bytes_per_s = -1\n",
     "fastsocks.toml:2: limits.rate_down_bytes_per_s: expected bytes per second >= 0 (0: no limit)"),
    ("[limits]\n\nrate_up_bytes_per_s = 1.5\n",
     "fastsocks.toml:3: limits.rate_up_bytes_per_s: expected an integer, not a number"),
    ("[[rules]]\naction = \"allow\"\nrate_up_bytes_per_s = -5\n",
     "fastsocks.toml:3: rules[1].rate_up_bytes_per_s: expected bytes per second >= 0 (0: no limit), not -5"),
    ("[[rules]]\naction = \"allow\"\n\nrate_down_bytes_per_s = true\n",
     "fastsocks.toml:4: rules[1].rate_down_bytes_per_s: expected bytes per second >= 0 (0: no limit), not True"),
    ("[[rules]]\naction = \"deny\"\nrate_down_bytes_per_s = 1000\n",
     "fastsocks.toml:3: rules[1].rate_down_bytes_per_s: only an allow rule's sessions move bytes"),
    ("[[rules]]\naction = \"deny\"\nuser_rate_down_bytes_per_s = 1000\n",
     "fastsocks.toml:3: rules[1].user_rate_down_bytes_per_s: only an allow rule's sessions move bytes"),
    ("[limits]\n\nclient_rate_up_bytes_per_s = -1\n",
     "fastsocks.toml:3: limits.client_rate_up_bytes_per_s: expected bytes per second >= 0 (0: no limit)"),
    ("[limits]\nquota_bytes = 1000\n",
     "fastsocks.toml:2: limits.quota_bytes: a quota needs a file to keep its counts in: set quota_db in [limits]"),
    ("[limits]\nquota_period = \"week\"\n", "fastsocks.toml:2: limits.quota_period: expected one of day, month"),
    ("[limits]\nquota_db = 5\n", "fastsocks.toml:2: limits.quota_db: expected a string, not an integer"),
    ("[policy]\ndefault = \"maybe\"\n", "fastsocks.toml:2: policy.default: expected 'allow' or 'deny'"),
    ("[policy]\ndefualt = \"deny\"\n", "fastsocks.toml:2: policy.defualt: unknown key"),
    ("workers = 3\n", "workers: unknown table"),
    ("[server\n", "fastsocks.toml:1: TOML: "),
    ("[[rules]]\ndest = [\"10.0.0.0/8\"]\n", "fastsocks.toml:1: rules[1].action: missing"),
    ("[[rules]]\naction = \"allow\"\n[[rules]]\naction = \"permit\"\n",
     "fastsocks.toml:4: rules[2].action: expected 'allow' or 'deny', not 'permit'"),
    ("[[rules]]\naction = \"deny\"\n\n[[rules]]\naction = \"deny\"\ndest = [\n  \"10.0.0.0/8\",\n  \"10.0.0.1/8\",\n]\n",
     "fastsocks.toml:6: rules[2].dest: '10.0.0.1/8' is not a network: 10.0.0.1/8 has host bits set"),
    ("[[rules]]\naction = \"deny\"\nport = [\"80\", \"90000\"]\n", "fastsocks.toml:3: rules[1].port: '90000': ports are 0-65535"),
    ("[[rules]]\naction = \"deny\"\nclient = [\"example.com\"]\n", "fastsocks.toml:3: rules[1].client: 'example.com' is not a network"),
    ("[[rules]]\naction = \"deny\"\ncommand = [\"associate\"]\n", "fastsocks.toml:3: rules[1].command: 'associate': expected some of"),
    ("[[rules]]\naction = \"deny\"\nuser = []\n", "fastsocks.toml:3: rules[1].user: empty list"),
    ("[[rules]]\naction = \"deny\"\nhost = [\"a\"]\n", "fastsocks.toml:3: rules[1].host: unknown key"),
    ("[server]\nlisten = [{ address = \"127.0.0.1:1081\", proxy_protocol = true }]\n",
     "fastsocks.toml:2: server.listen: a listener takes PROXY headers: name the networks of the balancers"),
    ("[server]\nlisten = [{ address = \"127.0.0.1:1081\", proxy = true }]\n",
     "fastsocks.toml:2: server.listen: expected \"HOST:PORT\", {address"),
    ("[server]\ntrusted_proxies = [\"10.0.0.0/33\"]\n",
     "fastsocks.toml:2: server.trusted_proxies: '10.0.0.0/33': expected an address or a network"),
    ("[server]\nmetrics = \"localhost:9180\"\n",
     "fastsocks.toml:2: server.metrics: 'localhost:9180': the host must be an IP address"),
    ("[server]\naccess_log_format = \"xml\"\n",
     "fastsocks.toml:2: server.access_log_format: expected text or json"),
    ("[server]\nlisten = [\"127.0.0.1:1080\", { address = \"127.0.0.1:1080\", proxy_protocol = true }]\n"
     "trusted_proxies = [\"10.0.0.1\"]\n", "fastsocks.toml:2: server.listen: the same address is named twice"),
])
def test_every_error_names_file_line_and_field(tmp_path, text, message):
    assert message in error_of(tmp_path, text)


def test_a_proxy_protocol_listener_beside_a_plain_one(tmp_path):
    s = load_text(tmp_path, '[server]\nlisten = ["127.0.0.1:1080", { address = "[::1]:1081", proxy_protocol = true }]\n'
                            'trusted_proxies = ["10.0.0.0/8", "::1"]\nmetrics = "127.0.0.1:9180"\n')
    assert s.listen == (ListenAddress("127.0.0.1", 1080), ListenAddress("::1", 1081, proxy_protocol=True))
    assert [str(n) for n in s.trusted_proxies] == ["10.0.0.0/8", "::1/128"]
    assert s.metrics == ListenAddress("127.0.0.1", 9180)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: file: cannot read it: No such file"):
        config.load(tmp_path / "nope.toml")


def test_an_open_proxy_is_refused_unless_asked_for(tmp_path):
    open_proxy = "[server]\nlisten = [\"0.0.0.0:1080\"]\n"
    assert "listen: 0.0.0.0:1080 is reachable from other hosts, with no authentication and no client rule" \
        in error_of(tmp_path, open_proxy)
    assert load_text(tmp_path, open_proxy + "allow_open_proxy = true\n").allow_open_proxy
    # a client rule, or authentication, makes it a deliberate choice
    load_text(tmp_path, open_proxy + "[[rules]]\naction = \"allow\"\nclient = [\"10.0.0.0/8\"]\n")
    load_text(tmp_path, open_proxy + "[auth]\nusers_file = \"u.txt\"\n")


def test_the_command_line_is_held_to_the_same_rule():
    with pytest.raises(ConfigError, match="an open proxy"):
        Settings(listen=(ListenAddress("0.0.0.0", 1080),))
    Settings(listen=(ListenAddress("0.0.0.0", 1080),), allow_open_proxy=True)


def test_reload_keeps_what_takes_a_restart(tmp_path):
    path = tmp_path / "fastsocks.toml"
    path.write_text("[server]\nworkers = 2\n[timeouts]\nidle_s = 5\n")
    old = config.load(path)
    path.write_text("[server]\nworkers = 4\n[timeouts]\nidle_s = 7\n[[rules]]\naction = \"deny\"\n")
    new, restart_only = config.reloaded(old, lambda: config.load(path))
    assert restart_only == ["workers"] and new.workers == 2
    assert new.idle_timeout_s == 7.0 and len(new.policy.rules) == 1


def test_the_access_log_format_is_read_and_takes_a_restart(tmp_path):
    path = tmp_path / "fastsocks.toml"
    path.write_text('[server]\naccess_log_format = "json"\n')
    old = config.load(path)
    assert old.access_log_format == "json" and config.load(path, {"access_log_format": "text"}).access_log_format == "text"
    path.write_text("[server]\n")
    new, restart_only = config.reloaded(old, lambda: config.load(path))
    assert restart_only == ["access_log_format"] and new.access_log_format == "json"


def test_rates_come_from_limits_and_a_rule_overrides_them(tmp_path):
    s = load_text(tmp_path, """
[limits]
rate_up_bytes_per_s = 1000
rate_down_bytes_per_s = 2000
[policy]
default = "allow"
[[rules]]
action = "allow"
port = [80]
rate_down_bytes_per_s = 50000
[[rules]]
action = "allow"
port = [81]
rate_up_bytes_per_s = 0
""")
    assert (s.rate_up_bytes_per_s, s.rate_down_bytes_per_s) == (1000, 2000)
    assert s.session_rates(0) == (1000, 50000)  # its own down, [limits]' up
    assert s.session_rates(1) == (0, 2000)      # 0: this rule's sessions are not limited up
    assert s.session_rates(-1) == s.session_rates(-2) == (1000, 2000)  # the default action, none
    assert "rate_up_bytes_per_s" not in config.RESTART_FIELDS  # SIGHUP: new sessions follow it


def test_rate_flags_override_the_file_and_are_checked(tmp_path):
    from fastsocks import cli

    args = cli.build_parser().parse_args(["--rate-up", "300", "--rate-down", "200000"])
    assert {k: v for k, v in cli.overrides_from_args(args).items() if k.startswith("rate")} == {
        "rate_up_bytes_per_s": 300, "rate_down_bytes_per_s": 200000}
    s = load_text(tmp_path, "[limits]\nrate_down_bytes_per_s = 5\n", cli.overrides_from_args(args))
    assert (s.rate_up_bytes_per_s, s.rate_down_bytes_per_s) == (300, 200000)
    with pytest.raises(ConfigError, match="rate_down_bytes_per_s: expected bytes per second >= 0"):
        cli.settings_from_args(cli.build_parser().parse_args(["--rate-down", "-1"]))


def test_a_rules_shared_rates_override_the_limits_ones_and_zero_lifts_them():
    settings = config.parse("[limits]\nuser_rate_down_bytes_per_s = 1000\nclient_rate_up_bytes_per_s = 50\n"
                            "[[rules]]\naction = \"allow\"\nuser = [\"alice\"]\nuser_rate_down_bytes_per_s = 0\n"
                            "client_rate_down_bytes_per_s = 7\n", "fastsocks.toml", {})
    assert settings.shared_rates(0) == (0, 0, 50, 7)      # the rule's own; [limits] where it says none
    assert settings.shared_rates(-1) == (0, 1000, 50, 0)  # the default action: [limits]
