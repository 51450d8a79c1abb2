#!/usr/bin/env python3
"""A product's backend talking to presenced's server API: publish to a room, read who is in
it. Standard library only (any HTTP client does; see docs/api.md for curl).

    presenced run --allow-anonymous --http 127.0.0.1:7480 --api-key-file api.key &
    python examples/api_backend.py http://127.0.0.1:7480 --key-file api.key --room lobby

Publishes one ``announcement`` event to the room (every member in every region receives it
as a ``broadcast`` with ``"from": {"server": true, ...}``), then prints the room's occupancy
and the users in it. Exit status 1 with the API's error code if a call is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.code = code


class Presenced:
    """A tiny client of the server API: one POST per call, JSON in and out."""

    def __init__(self, base_url: str, key: str, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.key = key
        self.timeout_s = timeout_s

    def call(self, name: str, **body: Any) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.base_url}/api/v1/{name}",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.load(response)  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:
            error = json.load(exc).get("error", {})
            raise ApiError(exc.code, error.get("code", "?"), error.get("message", "")) from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the daemon's --http address, e.g. http://127.0.0.1:7480")
    parser.add_argument("--key-file", required=True, help="the file given to --api-key-file")
    parser.add_argument("--room", default="lobby")
    parser.add_argument("--text", default="Hello from the backend")
    args = parser.parse_args()
    api = Presenced(args.url, Path(args.key_file).read_text().strip())
    try:
        published = api.call(
            "publish", room=args.room, event="announcement", data={"text": args.text}
        )
        print(f"published to {args.room}: {published['members_here']} member(s) on this daemon")
        occupancy = api.call("occupancy", room=args.room)
        regions = ", ".join(f"{r}: {n}" for r, n in occupancy["regions"].items()) or "none"
        print(
            f"occupancy of {args.room}: {occupancy['sessions']} session(s),"
            f" {occupancy['users']} user(s) (sessions by region: {regions})"
        )
        presence = api.call("presence", room=args.room)
        for user, sessions in sorted(presence["presences"].items()):
            where = ", ".join(sorted({s["region"] for s in sessions}))
            print(f"  {user}: {len(sessions)} session(s) in {where}")
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
