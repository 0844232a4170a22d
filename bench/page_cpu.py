"""CPU per page of the proxy's outbound work, in-process (issue 15): the 100-user page of
``bench/servers.py`` through what ``Proxy.outbound`` and ``Proxy.respond`` compute, without the
network or the database (their answers are given): the IDs collected, the documents rewritten,
``meta`` sealed, the read list, ``orjson.dumps`` and the leak guard's scan.

    python bench/page_cpu.py [--repeat 300] [--read-list] [--general]

By default the path a warm mapping cache gives (``translate_known``: one walk, the cache's
answers looked up as it goes, versions sealed on the way); ``--general`` the path without the
cache's answers (``translate_page``, the store's answers, ``render``, ``present_meta``), which
the proxy takes for a page whose IDs are not all cached (and for a domain with a scope).

Microseconds of CPU (``time.process_time``, so that other work on a shared machine counts less
than it would in wall-clock time) per page, the median and the minimum of ``--repeat`` runs, and
the same for ``orjson.loads`` of the page (what the parse-only proxy pays too) for comparison. A
ratio to ``bench/run.py``'s numbers is not meant: this isolates the Python work the broker adds
per page. The home's documents are rewritten in place, as the proxy's list handler does.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any

import orjson
from servers import GROUPS, USERS, user  # bench/ is on the path when this script runs

from broker.scim.attributes import SchemaIndex
from broker.scim.guard import IdShape, Scan, find_in_play
from broker.scim.knownpage import translate_known
from broker.scim.outbound import DomainView, translate_page
from broker.scim.policy import DomainPolicy
from broker.scim.rewrite import Endpoints, Translation
from broker.scim.schemas import DEFAULT_REFERENCES
from broker.scim.versions import VersionSealer, present_meta

HOME = "http://127.0.0.1:9/v2"
BROKER = "http://127.0.0.1:8/scim/v2"


@dataclass(frozen=True)
class Audience:
    id: str = "D1"
    unlinkable: bool = False
    timestamp_precision: int = 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--read-list", action="store_true", help="the bench's scoped domain")
    parser.add_argument(
        "--general", action="store_true", help="the path without the cache's answers"
    )
    args = parser.parse_args()

    page = orjson.dumps([user(u, "127.0.0.1:9") for u in USERS])
    outward = Translation(DEFAULT_REFERENCES, Endpoints.default(), HOME, BROKER)
    sealer = VersionSealer(bytes(64))
    shape = IdShape("[0-9a-f]{32}")
    attributes = SchemaIndex.default()
    policy = DomainPolicy(
        "S",
        read=("userName", "displayName", "emails", "groups") if args.read_list else None,
    )
    audience = Audience()
    schema = attributes.get("User")

    # The store's answers: one domain ID for each of the page's 105 entities (22 characters, as
    # the broker mints them).
    views = {
        internal: DomainView(f"{n:022d}".replace("0", "Q"))
        for n, internal in enumerate([*USERS, *GROUPS])
    }
    seal = sealer.sealing(audience.id)

    def once() -> bytes:
        parse_start = time.process_time_ns()
        docs: list[dict[str, Any]] = orjson.loads(page)  # the home's page, parsed
        start = time.process_time_ns()
        if args.general:
            translated = translate_page(docs, outward, resource_type="User")
            found = {i: views[i] for i in translated.wanted}
            internal_ids = [str(d["id"]) for d in docs]
            out = translated.render(found, in_place=True)
            presented = [
                present_meta(o, domain=audience, internal_id=i, sealer=sealer, in_place=True)
                for o, i in zip(out, internal_ids, strict=True)
                if o is not None
            ]
            wanted = translated.wanted
        else:
            known = translate_known(docs, outward, views.get, resource_type="User", seal=seal)
            assert known.count == len(docs)
            presented, wanted = docs, known.wanted
        shown = (
            presented
            if policy.read is None
            else [policy.readable(o, schema) for o in presented]  # as the list handler does
        )
        raw = orjson.dumps({"Resources": shown})
        scan = Scan.of("body", raw, shape)
        assert find_in_play([scan], wanted, shape) is None
        timings.append(time.process_time_ns() - start)
        parsing.append(start - parse_start)
        return raw

    timings: list[int] = []
    parsing: list[int] = []
    for _ in range(args.repeat):
        once()
    print(
        f"page CPU ({'general path' if args.general else 'cache answers'}): "
        f"{statistics.median(timings) / 1000:.0f} us per page (median of {args.repeat}; "
        f"minimum {min(timings) / 1000:.0f}); "
        f"orjson.loads of the page: {statistics.median(parsing) / 1000:.0f} us"
    )


if __name__ == "__main__":
    main()
