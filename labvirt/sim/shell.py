"""The guest behind a simulated serial console: a tty line discipline and a tiny shell.

A learner's first look inside a VM is its console, so the simulator answers the handful of
commands that show a VM is itself and can reach its peers (``hostname``, ``whoami``, ``uname``,
``cat /etc/os-release``, ``ping``). Bytes go in and out as a serial line carries them: the
guest echoes what it reads, ends lines with ``\\r\\n`` and erases with ``\\b \\b``. Pure Python
with no I/O, so the console can keep one per VMI and feed it whatever the websocket brings.
"""

from __future__ import annotations

import random
import shlex
from collections.abc import Callable
from dataclasses import dataclass

USER = "learner"
MAX_LINE_BYTES = 4096  # longer input rings the bell instead of growing without bound
MAX_PING_COUNT = 10  # every reply is written at once, so the count is capped
DEFAULT_PING_COUNT = 4  # a real ping runs until ^C; a console that cannot stream stops here
KERNEL = "6.8.0-45-generic"
KERNEL_VERSION = "#45-Ubuntu SMP PREEMPT_DYNAMIC Fri Aug 30 12:02:04 UTC 2024"
MACHINE = "x86_64"
OS_RELEASE = (
    'PRETTY_NAME="Ubuntu 24.04.1 LTS"\n'
    'NAME="Ubuntu"\n'
    'VERSION_ID="24.04"\n'
    'VERSION="24.04.1 LTS (Noble Numbat)"\n'
    "VERSION_CODENAME=noble\n"
    "ID=ubuntu\n"
    "ID_LIKE=debian\n"
    'HOME_URL="https://www.ubuntu.com/"\n'
    'SUPPORT_URL="https://help.ubuntu.com/"\n'
    'BUG_REPORT_URL="https://bugs.launchpad.net/ubuntu/"\n'
    'PRIVACY_POLICY_URL="https://www.ubuntu.com/legal/terms-and-policies/privacy-policy"\n'
    "UBUNTU_CODENAME=noble\n"
    "LOGO=ubuntu-logo\n"
)

_CR, _LF, _ESC, _BS, _DEL, _ETX, _BEL = 0x0D, 0x0A, 0x1B, 0x08, 0x7F, 0x03, b"\x07"


@dataclass(frozen=True)
class Peer:
    """What the guest's resolver found for a name: the canonical name and an address."""

    name: str
    address: str


Resolver = Callable[[str], Peer | None]


def _lines(text: str) -> str:
    """Text with ``\\r\\n`` line ends, as a tty with ONLCR writes it."""
    return text.replace("\n", "\r\n")


class Shell:
    """One VM's console state: the half-typed line and the shell that runs finished ones."""

    def __init__(self, hostname: str, resolve: Resolver, *, seed: int = 0) -> None:
        self.hostname = hostname
        self._resolve = resolve
        self._rng = random.Random(seed)
        self._line = bytearray()
        self._escape = 0  # 0: text; 1: after ESC; 2: inside a CSI/SS3 sequence
        self._after_cr = False
        self._commands: dict[str, Callable[[list[str]], str]] = {
            "hostname": lambda _: f"{self.hostname}\n",
            "whoami": lambda _: f"{USER}\n",
            "echo": self._echo,
            "uname": self._uname,
            "cat": self._cat,
            "ping": self._ping,
        }

    @property
    def prompt(self) -> bytes:
        return f"{USER}@{self.hostname}:~$ ".encode()

    def greeting(self) -> bytes:
        """What a new console connection shows: the prompt and anything typed before."""
        return self.prompt + bytes(self._line)

    def feed(self, data: bytes) -> bytes:
        """Read terminal input; return what the guest writes back (echo and output)."""
        out = bytearray()
        for byte in data:
            after_cr, self._after_cr = self._after_cr, byte == _CR
            if self._escape:
                self._skip_escape(byte)
            elif byte in (_CR, _LF):
                if byte == _LF and after_cr:
                    continue  # "\r\n" from the client ends one line, not two
                out += b"\r\n"
                out += self._run(bytes(self._line))
                self._line.clear()
                out += self.prompt
            elif byte < 0x20 or byte == _DEL:
                out += self._control(byte)
            elif len(self._line) >= MAX_LINE_BYTES:
                out += _BEL
            else:
                self._line.append(byte)
                out.append(byte)
        return bytes(out)

    def _skip_escape(self, byte: int) -> None:
        """Arrow keys and the like: readline would act on them; this shell ignores them."""
        if self._escape == 1:
            self._escape = 2 if byte in b"[O" else 0
        elif 0x40 <= byte <= 0x7E:
            self._escape = 0

    def _control(self, byte: int) -> bytes:
        if byte in (_DEL, _BS):
            if not self._line:
                return b""
            while self._line and self._line[-1] & 0xC0 == 0x80:
                self._line.pop()  # UTF-8 continuation bytes of the erased character
            if self._line:
                self._line.pop()
            return b"\b \b"
        if byte == _ETX:
            self._line.clear()
            return b"^C\r\n" + self.prompt
        if byte == _ESC:
            self._escape = 1
        return b""  # other control characters do nothing at a prompt

    # -- commands -----------------------------------------------------------------------------

    def _run(self, raw: bytes) -> bytes:
        line = raw.decode("utf-8", errors="replace")
        try:
            words = shlex.split(line)
        except ValueError:
            return b"-bash: syntax error: unexpected end of file\r\n"
        if not words:
            return b""
        command = self._commands.get(words[0])
        if command is None:
            return f"{words[0]}: command not found\r\n".encode()
        return _lines(command(words[1:])).encode()

    @staticmethod
    def _echo(args: list[str]) -> str:
        if args and args[0] == "-n":
            return " ".join(args[1:])
        return " ".join(args) + "\n"

    def _uname(self, args: list[str]) -> str:
        fields = {
            "-s": "Linux",
            "-n": self.hostname,
            "-r": KERNEL,
            "-v": KERNEL_VERSION,
            "-m": MACHINE,
            "-o": "GNU/Linux",
        }
        if not args:
            return "Linux\n"
        if args == ["-a"]:
            return (
                f"Linux {self.hostname} {KERNEL} {KERNEL_VERSION} "
                f"{MACHINE} {MACHINE} {MACHINE} GNU/Linux\n"
            )
        unknown = next((a for a in args if a not in fields), None)
        if unknown is not None:
            return (
                f"uname: invalid option -- '{unknown.lstrip('-')[:1]}'\n"
                "Try 'uname --help' for more information.\n"
            )
        return " ".join(fields[a] for a in args) + "\n"

    def _cat(self, args: list[str]) -> str:
        files = {"/etc/os-release": OS_RELEASE, "/etc/hostname": f"{self.hostname}\n"}
        out = []
        for path in args:
            content = files.get(path)
            out.append(
                content if content is not None else f"cat: {path}: No such file or directory\n"
            )
        return "".join(out)

    def _ping(self, args: list[str]) -> str:
        count, host = DEFAULT_PING_COUNT, None
        rest = list(args)
        while rest:
            arg = rest.pop(0)
            if arg.startswith("-c"):
                value = arg[2:] or (rest.pop(0) if rest else "")
                if not value:
                    return "ping: option requires an argument -- 'c'\n"
                if not value.isdigit() or int(value) < 1:
                    return (
                        f"ping: invalid argument: '{value}': "
                        "out of range: 1 <= value <= 9223372036854775807\n"
                    )
                count = min(int(value), MAX_PING_COUNT)
            elif arg.startswith("-") and arg != "-":
                return f"ping: invalid option -- '{arg[1:2]}'\n"
            else:
                host = arg
        if host is None:
            return "ping: usage error: Destination address required\n"
        peer = self._resolve(host)
        if peer is None:
            return f"ping: {host}: Name or service not known\n"
        target = f"{peer.name} ({peer.address})"
        times = [round(self._rng.uniform(0.25, 1.2), 3) for _ in range(count)]
        lines = [f"PING {target} 56(84) bytes of data."]
        lines += [
            f"64 bytes from {target}: icmp_seq={i + 1} ttl=64 time={t} ms"
            for i, t in enumerate(times)
        ]
        mean = sum(times) / count
        mdev = (sum((t - mean) ** 2 for t in times) / count) ** 0.5
        elapsed = (count - 1) * 1000 + int(self._rng.uniform(1, 5)) if count > 1 else 0
        lines += [
            "",
            f"--- {peer.name} ping statistics ---",
            f"{count} packets transmitted, {count} received, 0% packet loss, time {elapsed}ms",
            f"rtt min/avg/max/mdev = {min(times):.3f}/{mean:.3f}/{max(times):.3f}/{mdev:.3f} ms",
        ]
        return "\n".join(lines) + "\n"
