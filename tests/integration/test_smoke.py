from __future__ import annotations

from helpers import dcmtk, run_peer, ultrasound_files


def test_echo_and_store_one(start_daemon, db_url):
    d = start_daemon(database={"url": db_url})
    port = d.server.port
    r = run_peer([dcmtk("echoscu"), "-aec", "USFMD", "127.0.0.1", str(port)])
    assert r.returncode == 0, r.stderr
    f = ultrasound_files()[0]
    r = run_peer([dcmtk("dcmsend"), "-aec", "USFMD", "127.0.0.1", str(port), str(f)])
    assert r.returncode == 0, r.stderr
    assert d.receiver.counters.stored == 1
