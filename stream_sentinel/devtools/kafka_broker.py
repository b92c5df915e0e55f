"""A real single-node Apache Kafka (KRaft) on 127.0.0.1, for development and tests.

The broker jars come from Maven Central (``mvn dependency:copy-dependencies`` on a small
pom) and are cached outside the repository; each broker gets its own data folder,
formatted as a one-node KRaft cluster. Needs only Java 17+ and mvn.

    python -m stream_sentinel.devtools.kafka_broker start [--dir D] [--port P]   # prints the bootstrap address
    python -m stream_sentinel.devtools.kafka_broker status [--dir D]
    python -m stream_sentinel.devtools.kafka_broker stop [--dir D]

(``scripts/kafka-broker`` wraps this.) The pytest fixture uses the same class.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import cache_root

KAFKA_VERSION = "4.1.1"
SCALA = "2.13"

POM = f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>stream-sentinel</groupId><artifactId>kafka-broker-runtime</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_{SCALA}</artifactId>
      <version>{KAFKA_VERSION}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>2.24.3</version></dependency>
  </dependencies>
</project>
"""

LOG4J = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders><Console name="out" target="SYSTEM_OUT">
    <PatternLayout pattern="[%d] %p %m (%c)%n"/></Console></Appenders>
  <Loggers>
    <Logger name="kafka.server.KafkaRaftServer" level="INFO"/>
    <Logger name="kafka.server.BrokerServer" level="INFO"/>
    <Root level="WARN"><AppenderRef ref="out"/></Root>
  </Loggers>
</Configuration>
"""


class BrokerError(RuntimeError):
    pass


def require_tools() -> tuple[str, str]:
    java, mvn = shutil.which("java"), shutil.which("mvn")
    missing = [name for name, path in (("java (JDK 17+)", java), ("mvn (Apache Maven)", mvn)) if not path]
    if missing:
        raise BrokerError(
            f"the Kafka broker for development and tests needs {' and '.join(missing)}; "
            "install them (e.g. `apt-get install openjdk-17-jre-headless maven`)")
    return java, mvn  # type: ignore[return-value]


def resolve_jars(quiet: bool = True) -> Path:
    """Download Kafka's jars from Maven Central once; returns the folder holding them."""
    _, mvn = require_tools()
    lib = cache_root() / f"kafka-{SCALA}-{KAFKA_VERSION}" / "lib"
    if (lib / ".complete").exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        (Path(tmp) / "pom.xml").write_text(POM)
        out = Path(tmp) / "lib"
        if not quiet:
            print(f"resolving Apache Kafka {KAFKA_VERSION} from Maven Central ...", file=sys.stderr)
        proc = subprocess.run([mvn, "-q", "-B", "dependency:copy-dependencies", f"-DoutputDirectory={out}",
                               "-DincludeScope=runtime"], cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BrokerError(f"mvn could not resolve Kafka {KAFKA_VERSION}:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
        if lib.exists():
            shutil.rmtree(lib)
        os.replace(out, lib)
    (lib / ".complete").write_text(KAFKA_VERSION)
    return lib


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class BrokerState:
    pid: int
    port: int
    controller_port: int
    bootstrap: str
    data_dir: str



def new_cluster_id() -> str:
    """A KRaft cluster id (16 random bytes, URL-safe base64), never starting with "-": the
    storage tool's argument parser reads such an id as an option and refuses to format (one
    start in 64 failed that way). Kafka's own Uuid.randomUuid() redraws for the same reason."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id

class KafkaBroker:
    """One broker process; ``start()`` formats the folder on first use and reuses it after."""

    def __init__(self, root: str | os.PathLike[str], port: int | None = None):
        self.root = Path(root).absolute()
        self.port = port
        self.proc: subprocess.Popen | None = None

    @property
    def state_file(self) -> Path:
        return self.root / "broker.json"

    def state(self) -> BrokerState | None:
        try:
            return BrokerState(**json.loads(self.state_file.read_text()))
        except FileNotFoundError:
            return None

    def _config(self, port: int, cport: int) -> Path:
        props = self.root / "server.properties"
        props.write_text("\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{cport}",
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={self.root / 'data'}",
            "num.partitions=3",
            "auto.create.topics.enable=true",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=3",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "log.flush.interval.messages=1",  # a test broker that is killed keeps what it acknowledged
            "",
        ]))
        return props

    def start(self, timeout_s: float = 90.0) -> str:
        java, _ = require_tools()
        lib = resolve_jars()
        self.root.mkdir(parents=True, exist_ok=True)
        old = self.state()
        if old and _alive(old.pid):
            return old.bootstrap
        port = self.port or (old.port if old else free_port())
        cport = old.controller_port if old else free_port()
        props = self._config(port, cport)
        (self.root / "log4j2.xml").write_text(LOG4J)
        cp = f"{lib}/*"
        jvm = [java, "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
               f"-Dlog4j2.configurationFile={self.root / 'log4j2.xml'}", "-cp", cp]
        if not (self.root / "data" / "meta.properties").exists():
            cluster_id = new_cluster_id()
            for attempt in range(2):  # a half-formatted folder from a killed attempt is wiped and redone
                shutil.rmtree(self.root / "data", ignore_errors=True)
                fmt = subprocess.run(jvm + ["kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)],
                                     capture_output=True, text=True)
                if fmt.returncode == 0:
                    break
            if fmt.returncode != 0:
                raise BrokerError(f"formatting the KRaft log dir failed (exit {fmt.returncode}):\n{fmt.stdout}{fmt.stderr}")
        log = open(self.root / "broker.log", "ab")
        self.proc = subprocess.Popen(jvm + ["kafka.Kafka", str(props)], stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        bootstrap = f"127.0.0.1:{port}"
        state = BrokerState(self.proc.pid, port, cport, bootstrap, str(self.root / "data"))
        self.state_file.write_text(json.dumps(asdict(state)))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"the broker exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            if _answers(bootstrap):
                return bootstrap
            time.sleep(0.3)
        self.stop()
        raise BrokerError(f"the broker did not answer on {bootstrap} within {timeout_s:.0f}s; log:\n{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        try:
            return (self.root / "broker.log").read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> bool:
        state = self.state()
        if state is None or not _alive(state.pid):
            return False
        try:
            os.killpg(state.pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _alive(state.pid):
            time.sleep(0.2)
        if _alive(state.pid):
            os.killpg(state.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
        return True

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown (for fault tests)."""
        state = self.state()
        if state and _alive(state.pid):
            os.killpg(state.pid, signal.SIGKILL)
            if self.proc is not None:
                self.proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _answers(bootstrap: str) -> bool:
    """The broker accepts connections and (with confluent-kafka installed) serves metadata."""
    host, port = bootstrap.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            pass
    except OSError:
        return False
    try:
        from confluent_kafka.admin import AdminClient
    except ImportError:
        return True
    try:
        md = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 2000}).list_topics(timeout=2)
        return bool(md.brokers)
    except Exception:
        return False


POINTER = "kafka-broker.json"  # in the cache: where the script's default broker lives


def default_dir(create: bool) -> Path | None:
    """The script's broker lives in a temp folder; a pointer in the cache finds it again."""
    pointer = cache_root() / POINTER
    try:
        folder = Path(json.loads(pointer.read_text())["dir"])
        if folder.exists():
            return folder
    except (FileNotFoundError, KeyError, ValueError):
        pass
    if not create:
        return None
    folder = Path(tempfile.mkdtemp(prefix="stream-sentinel-kafka-"))
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text(json.dumps({"dir": str(folder)}))
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kafka-broker", description="a local single-node Kafka (KRaft) on 127.0.0.1")
    p.add_argument("action", choices=["start", "stop", "status", "fetch"])
    p.add_argument("--dir", default=None, help="broker folder, kept on stop (default: a temp folder, removed on stop)")
    p.add_argument("--port", type=int, default=None, help="listener port (default: a free one, kept across restarts)")
    args = p.parse_args(argv)
    folder = Path(args.dir) if args.dir else default_dir(create=args.action in ("start", "fetch"))
    if folder is None:
        print("not running" if args.action == "stop" else json.dumps({"running": False}))
        return 0 if args.action == "stop" else 1
    broker = KafkaBroker(folder, args.port)
    try:
        if args.action == "fetch":
            print(resolve_jars(quiet=False))
        elif args.action == "start":
            resolve_jars(quiet=False)
            print(broker.start())
        elif args.action == "stop":
            print("stopped" if broker.stop() else "not running")
            if not args.dir:  # the default broker's data is disposable
                shutil.rmtree(folder, ignore_errors=True)
                (cache_root() / POINTER).unlink(missing_ok=True)
        else:
            st = broker.state()
            up = bool(st and _alive(st.pid) and _answers(st.bootstrap))
            print(json.dumps({"running": up, **(asdict(st) if st else {})}))
            return 0 if up else 1
    except BrokerError as exc:
        print(f"kafka-broker: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
