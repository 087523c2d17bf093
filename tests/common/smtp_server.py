"""A real SMTP server for callmeter's tests, on Debian's python3-aiosmtpd.

Each message received is written to DIR as one JSON file (written to a temporary name, then
renamed, so a reader never sees half a file): the envelope, whether the session used TLS and
AUTH, and the message decoded by Python's email package (subject, headers, plain and HTML parts).

    python3 smtp_server.py --listen 127.0.0.1:2525 --dir DIR [--auth USER:PASSWORD]
                           [--starttls CERT.pem KEY.pem] [--reject-rcpt ADDRESS ...]

With --auth, AUTH is required; with --starttls, STARTTLS is required before anything else.
With --reject-rcpt, RCPT TO those addresses is answered 550 (a mailbox that does not exist),
as a real server answers for a departed colleague; the other recipients are accepted.
"""

import argparse
import asyncio
import email
import email.policy
import json
import os
import ssl
import time

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


class Saver:
    def __init__(self, directory, reject=(), data_delay=0.0):
        self.directory = directory
        self.data_delay = data_delay
        self.count = 0
        self.reject = set(a.lower() for a in reject)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.lower() in self.reject:
            return "550 5.1.1 <%s>: Recipient address rejected: User unknown" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        msg = email.message_from_bytes(envelope.original_content or envelope.content,
                                       policy=email.policy.default)
        plain = msg.get_body(preferencelist=("plain",))
        html = msg.get_body(preferencelist=("html",))
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "tls": session.ssl is not None,
            "authenticated": bool(getattr(session, "authenticated", False)),
            "subject": str(msg["subject"]),
            "from": str(msg["from"]),
            "to": str(msg["to"]),
            "content_type": msg.get_content_type(),
            "plain": plain.get_content() if plain is not None else None,
            "html": html.get_content() if html is not None else None,
        }
        name = os.path.join(self.directory, "%020d-%04d.json" % (time.time_ns(), self.count))
        with open(name + ".tmp", "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.rename(name + ".tmp", name)
        # A server that takes its time to answer the end of DATA (content filtering, a slow
        # queue): the message is already kept when the client waits for the 250.
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        return "250 Message accepted for delivery"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--auth")
    parser.add_argument("--starttls", nargs=2, metavar=("CERT", "KEY"))
    parser.add_argument("--reject-rcpt", nargs="*", default=[])
    parser.add_argument("--data-delay", type=float, default=0.0)
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)

    kwargs = {}
    if args.starttls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*args.starttls)
        kwargs.update(tls_context=context, require_starttls=True)
    if args.auth:
        user, password = args.auth.split(":", 1)

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (isinstance(auth_data, LoginPassword)
                  and auth_data.login.decode() == user
                  and auth_data.password.decode() == password)
            return AuthResult(success=ok)

        kwargs.update(authenticator=authenticator, auth_required=True,
                      auth_require_tls=bool(args.starttls))

    handler = Saver(args.dir, args.reject_rcpt, args.data_delay)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(
        loop.create_server(lambda: SMTP(handler, **kwargs), host, int(port)))
    print("ready", flush=True)
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == "__main__":
    main()
