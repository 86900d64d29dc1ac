"""A real SMTP server for Tessera's tests (aiosmtpd, Debian's python3-aiosmtpd).

It speaks SMTP with STARTTLS required before anything else (or implicit TLS with
--implicit-tls), asks for AUTH (PLAIN or LOGIN, only over TLS) when --auth is given,
and writes each message it accepts, as received, to MAILDIR/<n>.eml (written to a
temporary name first, then renamed, so a reader never sees half a message). With
--refuse CODE it answers every RCPT TO with that code (a 4xx or 5xx). It prints
"ready" on stdout once it listens, and stops on SIGTERM.

    server.py --port P --cert CERT.pem --key KEY.pem --maildir DIR [--auth USER:PASS]
              [--implicit-tls | --no-tls] [--refuse 450]
"""

import argparse
import itertools
import os
import signal
import ssl
import sys

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Maildir:
    def __init__(self, path, refuse):
        self.path = path
        self.refuse = refuse
        # Numbering goes on after what an earlier run of the server wrote.
        existing = [int(n.split(".")[0]) for n in os.listdir(path) if n.endswith(".eml")]
        self.counter = itertools.count(max(existing, default=0) + 1)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.refuse:
            return f"{self.refuse} refused for the test"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        n = next(self.counter)
        tmp = os.path.join(self.path, f".{n}.tmp")
        with open(tmp, "wb") as f:
            f.write(b"X-Test-Envelope-To: " + ", ".join(envelope.rcpt_tos).encode() + b"\r\n")
            tls = session.ssl or server.transport.get_extra_info("ssl_object") is not None
            f.write(b"X-Test-TLS: " + (b"yes" if tls else b"no") + b"\r\n")
            f.write(envelope.original_content or envelope.content)
        os.rename(tmp, os.path.join(self.path, f"{n}.eml"))
        return "250 Message accepted"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--maildir", required=True)
    p.add_argument("--auth")
    p.add_argument("--implicit-tls", action="store_true")
    p.add_argument("--no-tls", action="store_true")
    p.add_argument("--refuse")
    args = p.parse_args()

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    os.makedirs(args.maildir, exist_ok=True)

    def authenticator(server, session, envelope, mechanism, data):
        if not isinstance(data, LoginPassword) or not args.auth:
            return AuthResult(success=False, handled=False)
        user, password = args.auth.split(":", 1)
        ok = data.login == user.encode() and data.password == password.encode()
        return AuthResult(success=ok)

    smtp_kwargs = dict(
        authenticator=authenticator,
        auth_required=bool(args.auth),
        auth_require_tls=True,
    )
    handler = Maildir(args.maildir, args.refuse)
    if args.no_tls:
        smtp_kwargs["auth_require_tls"] = False
        controller = Controller(handler, hostname=args.host, port=args.port, **smtp_kwargs)
    elif args.implicit_tls:
        # aiosmtpd counts only STARTTLS as TLS for AUTH; here every byte is already
        # encrypted, so AUTH is offered from the start.
        smtp_kwargs["auth_require_tls"] = False
        controller = Controller(
            handler, hostname=args.host, port=args.port, ssl_context=context, **smtp_kwargs
        )
    else:
        controller = Controller(
            handler,
            hostname=args.host,
            port=args.port,
            tls_context=context,
            require_starttls=True,
            **smtp_kwargs,
        )
    # Blocked before the server's thread starts, so that it inherits the mask and the
    # signal waits for sigwait below.
    stopping = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
    controller.start()
    print("ready", flush=True)
    signal.sigwait(stopping)
    controller.stop()


if __name__ == "__main__":
    sys.exit(main())
