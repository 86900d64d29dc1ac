"""Schemathesis hooks for Tessera's contract run (tests/api/schemathesis.rs).

Every generated request is authenticated with a fresh access token from a login of the
account named in TESSERA_ST_EMAIL / TESSERA_ST_PASSWORD (an admin), so that a generated
/logout or /revoke cannot leave the rest of the run unauthenticated; /introspect, which
takes a resource server's credentials instead, gets TESSERA_ST_CLIENT ("id:secret") as
HTTP Basic.
"""

import base64

import json
import os
import urllib.request

import schemathesis


@schemathesis.auth(refresh_interval=None)
class FreshLogin:
    def get(self, case, context):
        if case.path == "/introspect":
            client = os.environ["TESSERA_ST_CLIENT"].encode()
            return "Basic " + base64.b64encode(client).decode()
        base = os.environ["TESSERA_ST_BASE"]
        body = json.dumps(
            {
                "email": os.environ["TESSERA_ST_EMAIL"],
                "password": os.environ["TESSERA_ST_PASSWORD"],
            }
        ).encode()
        request = urllib.request.Request(
            base + "/login",
            data=body,
            headers={"content-type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return "Bearer " + json.load(answer)["access_token"]

    def set(self, case, data, context):
        case.headers = case.headers or {}
        case.headers["Authorization"] = data
