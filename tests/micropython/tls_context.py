# The SSLContext the TLS tests give the client: the test CA to verify the
# broker and, for mutual TLS, the client certificate ("<name>.crt.der" and
# "<name>.key.der").
import tls


def context(ca, client=None):
    ctx = tls.SSLContext(tls.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = tls.CERT_REQUIRED
    ctx.load_verify_locations(open(ca, "rb").read())
    if client:
        ctx.load_cert_chain(open(client + ".crt.der", "rb").read(), open(client + ".key.der", "rb").read())
    return ctx
