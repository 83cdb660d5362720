"""executor.core.nwfilter_xml: the filter's rules and the comparison setup and doctor use."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from executor.core.nwfilter_xml import FILTER_NAME, build_job_filter, same_rules


def rules(xml: str) -> list[tuple[str, str, str, str, dict[str, str]]]:
    root = ET.fromstring(xml)
    return [
        (r.get("action"), r.get("direction"), r.get("priority"), r[0].tag, dict(r[0].attrib))
        for r in root.findall("rule")
    ]


def test_the_filter_keeps_clean_traffic_and_orders_accepts_before_drops():
    root = ET.fromstring(build_job_filter())
    assert root.get("name") == FILTER_NAME and root.get("chain") == "root"
    assert [f.get("filter") for f in root.findall("filterref")] == ["clean-traffic"]
    found = rules(build_job_filter())
    assert all(direction == "out" for _, direction, *_ in found)  # only what the VM sends
    accepts = [int(p) for action, _, p, *_ in found if action == "accept"]
    drops = [int(p) for action, _, p, *_ in found if action == "drop"]
    assert max(accepts) < min(drops)
    assert ("drop", "out", "310", "all", {"dstipaddr": "$BLOCK_NET[@2]", "dstipmask": "$BLOCK_MASK[@2]"}) in found
    assert ("accept", "out", "210", "tcp", {"dstipaddr": "$GATEWAY", "dstportstart": "$HOST_PORT[@3]"}) in found


def test_same_rules_ignores_the_uuid_libvirt_adds_and_sees_a_changed_rule():
    ours = build_job_filter()
    as_libvirt_shows_it = ours.replace("<filterref", "<uuid>47a9874b-638b-4bf1-976b-ae8a2121e2b9</uuid><filterref", 1)
    assert same_rules(as_libvirt_shows_it, ours)
    assert not same_rules(ours.replace('priority="310"', 'priority="50"'), ours)
    assert not same_rules(ours.replace('chain="root"', 'chain="ipv4"'), ours)
    assert not same_rules("<filter", ours)
