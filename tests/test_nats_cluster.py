"""A 3-node nats-server cluster from the configurations `hub init --cluster 3` writes,
with a real `hub serve` and simulated devices (docs/OPERATIONS.md "A NATS cluster"), and
an edge site's leaf node from `hub site add` ("Adding an edge site").

- every stream and bucket the hub makes is at 3 replicas;
- one node is SIGKILLed in the middle of a rollout (the leader of the REPORTS stream,
  so the stream must elect another): the rollout completes, every inference the
  devices reported is counted (sent == counted) and the ledger verifies;
- a site's uplink is cut for longer than any device timeout while a deployment is made:
  restored, every site device installs it and its spooled telemetry is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import StreamConfig
from sqlalchemy import Engine, create_engine, func, select

from edge_agent.protocol.names import (
    ASSIGNMENTS_BUCKET,
    CLUSTER_JS_DOMAIN,
    LEDGER_STREAM,
    MANIFESTS_BUCKET,
    MODELS_BUCKET,
    RELEASES_BUCKET,
    REPORTS_STREAM,
    ROOTS_BUCKET,
)
from edge_agent.transport import kv_watch
from edge_agent.transport.connect import NatsAuth
from edge_agent.transport.connect import connect as nats_connect
from hub import events as ev
from hub.client import HubClient
from hub.home.config import HubConfig, init_home
from hub.home.nats_config import node_conf_path
from hub.home.sites import add_site, cluster_leaf_urls
from hub.service.nats import NatsEdge
from hub.telemetry.ingest import AGG
from hub.uploads import UPLOADS_STREAM
from ledger.retry import nats_servers
from ledger.signing import SigningKey
from ledger.storage.store import LedgerStore
from testkit.fleet_sim import SimFleet
from testkit.modelgen import write_validation_set
from testkit.nats_cluster import ConfiguredNats, NatsCluster, free_port_run, wait_jetstream
from testkit.nats_server import find_nats_server
from testkit.tcp_proxy import TcpProxy
from tests.fleet import REPO_ROOT

pytestmark = [pytest.mark.nats, pytest.mark.timeout(150)]
N = 6


@dataclass
class ClusterHub:
    """A cluster of three nodes and one `hub serve` process (SQLite ledger)."""

    config: HubConfig
    cluster: NatsCluster
    tmp: Path
    proc: subprocess.Popen[bytes] | None = None
    engine: Engine = field(init=False)

    def __post_init__(self) -> None:
        self.engine = create_engine(f"sqlite:///{self.config.database_url()}")

    def start_hub(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        with open(self.tmp / "hub.log", "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hub.cli", "serve", "--home", str(self.config.home),
                 "--wait-nats", "60"],
                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env)

    async def client(self, key: SigningKey | None = None) -> HubClient:
        key = key or SigningKey.load(self.config.operator_key_path("admin"))
        return await HubClient.connect(self.config.nats_url, key, timeout=10,
                                       auth=self.config.operator_auth(key))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.engine.dispose()


def cluster_home(tmp_path: Path, size: int = 3) -> tuple[HubConfig, NatsCluster]:
    """A hub home for a `size`-node cluster on free loopback ports, and its servers."""
    base = free_port_run(size * 3)
    config = init_home(tmp_path / "hub", f"nats://127.0.0.1:{base}", cluster=size,
                       cluster_port=base + size, leaf_port=base + 2 * size)
    cluster = NatsCluster([node_conf_path(config.home, i) for i in range(1, size + 1)],
                          tmp_path / "nats-logs", config.nats_url.split(","))
    return config, cluster


@contextlib.contextmanager
def running(cluster: NatsCluster) -> Iterator[NatsCluster]:
    try:
        yield cluster.start()
    finally:
        cluster.close()


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    async def poll() -> None:
        while not check():
            await asyncio.sleep(0.1)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@pytest.fixture
async def cluster_hub(tmp_path: Path) -> AsyncIterator[ClusterHub]:
    config, cluster = cluster_home(tmp_path)
    assert config.nats_replicas == 3
    with running(cluster):
        await wait_jetstream(cluster.url, **config.nats_auth("hub").options())
        hub = ClusterHub(config, cluster, tmp_path)
        hub.start_hub()
        try:
            await hub_ready(hub)
            yield hub
        finally:
            hub.stop()


async def hub_ready(hub: ClusterHub, timeout: float = 60) -> None:
    async def ask() -> None:
        while True:
            assert hub.proc is not None and hub.proc.poll() is None, \
                (hub.tmp / "hub.log").read_text()[-3000:]
            with contextlib.suppress(Exception):
                async with await hub.client() as admin:
                    await admin.call("status")
                    return
            await asyncio.sleep(0.3)

    await asyncio.wait_for(ask(), timeout)


LAYOUT = (REPORTS_STREAM, LEDGER_STREAM, UPLOADS_STREAM, f"KV_{ASSIGNMENTS_BUCKET}",
          f"KV_{MANIFESTS_BUCKET}", f"OBJ_{MODELS_BUCKET}", f"OBJ_{RELEASES_BUCKET}")


async def stream_replicas(config: HubConfig,
                          names: tuple[str, ...] = (*LAYOUT, f"KV_{ROOTS_BUCKET}"),
                          ) -> dict[str, Any]:
    """stream name -> (replicas, the node that leads it) for the hub's streams."""
    nc = await nats_connect(config.nats_url, config.nats_auth("hub"))
    try:
        js = nc.jetstream()
        out = {}
        for name in names:
            info = await js.stream_info(name)
            out[name] = (info.config.num_replicas,
                         info.cluster.leader if info.cluster is not None else None)
        return out
    finally:
        await nc.close()


async def release_model(hub: ClusterHub, path: Path, version: str) -> None:
    approver = SigningKey.generate()
    async with await hub.client() as admin:
        await admin.call("operator.add", {"name": f"approver-{version}",
                                          "roles": ["approver"], "public": approver.public.raw})
        await admin.register_model(path, "kws", version)
        data = write_validation_set(path, hub.tmp / f"kws-{version}-validation.npz")
        assert (await admin.validate_model("kws", version, data))["passed"]
    async with await hub.client(approver) as appr:
        await appr.call("model.approve", {"name": "kws", "version": version})
    async with await hub.client() as admin:
        await admin.call("model.release", {"name": "kws", "version": version})


def entries(config: HubConfig) -> list[Any]:
    with LedgerStore.open(config.database_url(), create=False) as store:
        return list(store.iter_entries())


def of_kind(config: HubConfig, kind: str, rollout: str) -> list[Any]:
    return [e for e in entries(config)
            if e.kind == kind and e.payload.get("rollout") == rollout]


def counted(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.coalesce(func.sum(AGG.c.inferences), 0)))
                   .scalar_one())


def verify_ledger(config: HubConfig) -> None:
    """What `ledger verify` checks: the chain, every entry's signature, the tree."""
    with LedgerStore.open(config.database_url(), create=False) as store:
        result = store.verify()
        assert result.ok, result.problem
    done = subprocess.run(
        [sys.executable, "-m", "ledger.cli", "verify", "--home", str(config.home),
         "--log-key", (config.home / "log.vkey").read_text().strip()],
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), capture_output=True, text=True,
        timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_init_writes_one_config_per_node(tmp_path: Path) -> None:
    config, cluster = cluster_home(tmp_path)
    assert config.nats_url.count(",") == 2 and config.nats_replicas == 3
    assert nats_servers(config.nats_url) == cluster.urls
    texts = [conf.read_text() for conf in cluster.configs]
    for key in ("server_name", "listen", "store_dir", "pid_file"):
        values = [next(ln for ln in t.splitlines() if key in ln) for t in texts]
        assert len(set(values)) == 3, (key, values)  # distinct per node
    for conf in cluster.configs:  # nats-server's own check of the file
        done = subprocess.run([find_nats_server(), "-t", "-c", str(conf)],
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
    one = init_home(tmp_path / "one", "nats://127.0.0.1:4222", cluster=1)
    assert one.nats_replicas == 1 and "," not in one.nats_url


def test_a_site_link_is_leaf_only_and_device_wide(tmp_path: Path) -> None:
    config, _ = cluster_home(tmp_path)
    site = add_site(config.home, "plant-a", "127.0.0.1:14222")
    users = (config.home / "nats" / "users.conf").read_text()
    link = users.split("edge site plant-a")[1].split("# reload probe")[0]
    assert 'allowed_connection_types: ["LEAFNODE"]' in link
    assert '"fleet.report.>"' in link and '"$JS.fleet.API.STREAM.INFO.KV_assignments"' in link
    for never in ("hub.api.", "ledger.api.", "upload.", "$JS.API.STREAM.CREATE",
                  "$JS.API.STREAM.DELETE", '"$JS.API.>"', '">"'):
        assert never not in link, never
    site_users = site.users_conf.read_text()
    assert '"enrol"' in site_users
    assert '"hub"' not in site_users and '"witness"' not in site_users
    leaf = site.leaf_conf.read_text()
    assert leaf.count("nats-leaf://site-plant-a:") == 3  # every node's leaf port
    done = subprocess.run([find_nats_server(), "-t", "-c", str(site.leaf_conf)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


async def test_existing_streams_are_scaled_in_place(tmp_path: Path) -> None:
    """A home that moves from one replica to three: the hub's streams and buckets made
    at R1 are brought to R3 at the next start, keeping what they hold."""
    config, cluster = cluster_home(tmp_path)
    engine = create_engine(f"sqlite:///{tmp_path / 'scratch.db'}")
    with running(cluster):
        await wait_jetstream(cluster.url, **config.nats_auth("hub").options())
        for replicas in (1, 3):
            edge = NatsEdge(replace(config, nats_replicas=replicas), engine)
            await edge.connect()
            try:
                await edge.ensure_layout()
                if replicas == 1:
                    await edge.put_assignment("dev-1", b"kept")
            finally:
                await edge.close()
            streams = await stream_replicas(config, LAYOUT)  # ensure_layout's own
            assert {r for r, _ in streams.values()} == {replicas}
        nc = await nats_connect(config.nats_url, config.nats_auth("hub"))
        try:
            kv = await nc.jetstream().key_value(ASSIGNMENTS_BUCKET)
            assert (await kv.get("dev-1")).value == b"kept"
        finally:
            await nc.close()
    engine.dispose()


async def test_a_users_file_with_accounts_works_on_the_cluster(tmp_path: Path) -> None:
    """The identities moving into NATS accounts (static `accounts {}` in users.conf):
    every node reads the same file, so each knows the account and its JetStream; a
    replicated stream made in it through one node is served through another."""
    config, cluster = cluster_home(tmp_path)
    (config.home / "nats" / "users.conf").write_text(
        "accounts {\n  FLEET {\n    jetstream: enabled\n"
        '    users: [ { user: "hub", password: "pw" } ]\n  }\n}\n')
    with running(cluster):
        await wait_jetstream(cluster.url, user="hub", password="pw")
        first = await nats_connect(cluster.urls[0], NatsAuth(user="hub", password="pw"))
        last = await nats_connect(cluster.urls[2], NatsAuth(user="hub", password="pw"))
        try:
            await first.jetstream().add_stream(StreamConfig(
                name="ACC", subjects=["acc.>"], num_replicas=3))
            await last.jetstream().publish("acc.x", b"1")
            info = await first.jetstream().stream_info("ACC")
            assert info.config.num_replicas == 3 and info.state.messages == 1
        finally:
            await first.close()
            await last.close()


async def test_streams_at_r3_and_a_node_killed_mid_rollout(
    cluster_hub: ClusterHub, model_files: dict[str, Path], tmp_path: Path
) -> None:
    hub = cluster_hub
    config = hub.config
    streams = await stream_replicas(config)
    assert {name: r for name, (r, _) in streams.items()} == dict.fromkeys(streams, 3)

    await release_model(hub, model_files["1"], "1")
    sim = SimFleet(config.nats_url, tmp_path / "sim", config.trust_root_path, N,
                   rate=4.0, window=0.5)
    try:
        async with await hub.client() as admin:
            await sim.enroll(admin, group="lab")
            await sim.start()
            await sim.wait_watching(60)
            rid = str((await admin.call("rollout.create", {
                "model": "kws", "version": "1", "target": "group=lab",
                "waves": "34%,100%", "bake": "2s", "min_success": 1.0,
                "max_failure": 0.0, "deadline": "90s"}))["rollout"])
            await admin.call("rollout.start", {"rollout": rid})
        await until(lambda: bool(of_kind(config, ev.ROLLOUT_WAVE_COMPLETED, rid)), 60,
                    "the first wave to complete")
        # The node that leads REPORTS: the stream must elect a new leader for the
        # devices' reports and the hub's intake to go on.
        leader = (await stream_replicas(config))[REPORTS_STREAM][1]
        victim = next(n for n in hub.cluster.nodes if n.config_file.stem ==
                      f"node-{leader.rsplit('-', 1)[1]}")
        victim.kill()
        print(f"\nSIGKILLed {leader} (led {REPORTS_STREAM}) in the middle of rollout {rid}")
        await until(lambda: bool(of_kind(config, ev.ROLLOUT_COMPLETED, rid)), 90,
                    "the rollout to complete on two nodes")
        applied = {e.subject for e in entries(config) if e.kind == ev.DEVICE_UPDATE_APPLIED}
        assert applied == {f"device:{d}" for d in sim.ids}
        await sim.quiesce(timeout=60)
        produced = sim.produced()
        assert produced > 0
        await until(lambda: counted(hub.engine) >= produced, 60,
                    f"telemetry counted == sent ({produced})")
        assert counted(hub.engine) == produced
        assert not sim.dead()
        # Two of three nodes still hold every stream: each has a leader on them (a
        # stream the killed node led may still be electing: ask again until then).
        async def led_elsewhere() -> None:
            while True:
                with contextlib.suppress(Exception):
                    after = await stream_replicas(config)
                    if all(now not in (None, leader) for _, now in after.values()):
                        return
                await asyncio.sleep(0.5)

        await asyncio.wait_for(led_elsewhere(), 60)
    finally:
        await sim.stop()
    hub.stop()
    verify_ledger(config)


CUT_S = 20.0  # the uplink cut: longer than every device-side timeout (see below)


async def test_a_site_cut_off_catches_up(
    cluster_hub: ClusterHub, model_files: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Devices at an edge site (connected to its leaf node) while the site's uplink is
    partitioned for CUT_S: longer than the JetStream request timeouts, the ordered
    consumers' heartbeats and, lowered here to 5 s, the inactive threshold of the
    devices' assignment watch consumers (so the cluster drops them during the cut and
    they must be made again). A deployment made during the cut reaches every site
    device once the link is back, and the telemetry they spooled meanwhile is counted."""
    monkeypatch.setattr(kv_watch, "INACTIVE_THRESHOLD", 5.0)
    hub = cluster_hub
    config = hub.config
    await release_model(hub, model_files["1"], "1")
    await release_model(hub, model_files["2"], "2")
    # A proxy in front of every node's leaf port: the site's uplink, to cut at once.
    uplinks = [await TcpProxy.start("127.0.0.1", int(url.rsplit(":", 1)[1]))
               for url in cluster_leaf_urls(config.home)]
    site_port = free_port_run(1)
    site = add_site(config.home, "lab", f"127.0.0.1:{site_port}",
                    uplinks=[proxy.url("nats-leaf") for proxy in uplinks])
    # The link password is for a leaf node only, not a client login.
    with pytest.raises(Exception, match=r"[Aa]uthorization"):
        await nats_connect(config.nats_url, NatsAuth(
            user="site-lab", password=site_password(site.directory)), retry_for=0,
            max_reconnect_attempts=0, allow_reconnect=False)
    sim = SimFleet(f"nats://127.0.0.1:{site_port}", tmp_path / "sim",
                   config.trust_root_path, N, rate=4.0, window=0.5,
                   js_domain=CLUSTER_JS_DOMAIN)
    leaf = ConfiguredNats(site.leaf_conf, tmp_path / "leaf.log")
    try:
        async with await hub.client() as admin:
            await sim.enroll(admin)  # the hub writes the site's users file too
        leaf.start()
        await until(lambda: "Leafnode connection created" in leaf.log_path.read_text(), 30,
                    "the leaf to link to the cluster")
        await sim.start()
        await sim.wait_watching(60)
        async with await hub.client() as admin:
            await admin.call("deploy", {"model": "kws", "version": "1", "all": True})

        def applied(version: str) -> set[str]:
            return {e.subject for e in entries(config) if e.kind == ev.DEVICE_UPDATE_APPLIED
                    and e.payload.get("version") == version}

        every = {f"device:{d}" for d in sim.ids}
        await until(lambda: applied("1") == every, 60, "the site's devices to install kws/1")
        await until(lambda: counted(hub.engine) > 0, 30, "site telemetry to be counted")

        for proxy in uplinks:
            proxy.partition()
            proxy.reset_all()
        async with await hub.client() as admin:
            await admin.call("deploy", {"model": "kws", "version": "2", "all": True})
        await until(lambda: sim.spooled() > 0, 30, "the site's devices to spool reports")
        await asyncio.sleep(CUT_S)
        assert not applied("2")
        assert {a.model_meta.get("version") for a in sim.agents.values()} == {"1"}
        spooled = sim.spooled()
        print(f"\nuplink cut for {CUT_S:g} s: {spooled} reports spooled at the site")
        for proxy in uplinks:
            proxy.heal()
        await until(lambda: applied("2") == every, 90,
                    "every site device to install the deployment made during the cut")
        await sim.quiesce(timeout=60)
        produced = sim.produced()
        await until(lambda: counted(hub.engine) >= produced, 60,
                    f"telemetry counted == sent ({produced})")
        assert counted(hub.engine) == produced
        assert not sim.dead()
    finally:
        await sim.stop()
        leaf.stop()
        for proxy in uplinks:
            await proxy.close()
    hub.stop()
    verify_ledger(config)


def site_password(directory: Path) -> str:
    return str(tomllib.loads((directory / "link.toml").read_text())["password"])
