"""One writer per labels dataset (maskrcnn.lease), on local disk and on S3: of writers that
race, exactly one holds the lease; the others are told who does; a dead holder's lease is
taken over once it expires, and the holder then knows it lost it."""

from __future__ import annotations

import json
import threading
import time

import pytest

from maskrcnn import storage
from maskrcnn.lease import Lease, LeaseHeld, LeaseLost, holder


@pytest.fixture(params=["local", "s3"])
def dataset(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "labels")
    return f"s3://{request.getfixturevalue('bucket')}/labels"


def test_create_new_lets_exactly_one_of_racing_writers_through(dataset):
    uri = storage.join(dataset, "one.json")
    results: list[bool] = []
    start = threading.Barrier(8)

    def write(i: int) -> None:
        start.wait()
        results.append(storage.create_new(uri, f"writer {i}".encode()))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert storage.read_text(uri).startswith("writer ")
    assert [u for u in storage.iter_files(dataset)] == [uri]  # no staged file left behind


def test_a_second_run_is_told_who_holds_the_dataset_then_takes_it_once_released(dataset):
    first = Lease(dataset, ttl=60)
    first.acquire()
    with pytest.raises(LeaseHeld, match=r"labels is being labelled by another run \(host .+ pid \d+ since .+Z"):
        Lease(dataset, ttl=60).acquire()
    assert holder(dataset)["pid"] == first.holder["pid"]
    threading.Timer(1.0, first.release).start()
    with Lease(dataset, ttl=60, wait=30) as second:  # waits for the release
        assert second.generation == first.generation + 1
        second.check()
    assert holder(dataset) is None


def test_of_racing_runs_exactly_one_takes_the_lease(dataset):
    won: list[Lease] = []
    lost: list[str] = []
    start = threading.Barrier(6)

    def take() -> None:
        lease = Lease(dataset, ttl=60)
        start.wait()
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeld as err:
            lost.append(str(err))

    threads = [threading.Thread(target=take) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 5
    won[0].release()


def test_a_dead_holders_lease_is_taken_over_when_it_expires_and_the_holder_knows(dataset):
    dead = Lease(dataset, ttl=2)
    dead.acquire()
    dead._stop.set()  # the holder stops renewing, as a killed one does
    dead._renewer.join()
    with pytest.raises(LeaseHeld):
        Lease(dataset, ttl=2).acquire()
    time.sleep(2.2)
    with Lease(dataset, ttl=60) as taker:
        assert taker.generation == dead.generation + 1
        with pytest.raises(LeaseLost, match="expired"):
            dead.check()
    files = list(storage.iter_files(storage.join(dataset, "_lease")))
    assert len(files) == 1 and json.loads(storage.read_text(files[0]))["released"] is True


def test_a_live_holder_renews_its_lease_past_the_ttl(dataset):
    with Lease(dataset, ttl=1.5) as live:
        time.sleep(2.5)
        live.check()
        with pytest.raises(LeaseHeld):
            Lease(dataset, ttl=1.5).acquire()
