"""Credentials out of everything we print, log or write: URIs with `user:password@` and secret
query parameters (`?token=...`).

A tracking URI such as `https://alice:s3cret@mlflow.example.org/?token=abc` authenticates the
client; printed in a log, stored as an MLflow param or written to config.resolved.yaml it would
hand the password to anyone who can read those. The user name stays (it says whose server it
is); the secret becomes `***`. Prefer MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or
MLFLOW_TRACKING_TOKEN) over secrets in the URI: they never reach the config at all.
"""
from __future__ import annotations

import re

MASK = "***"
# Query parameter names that carry a secret (compared in lower case).
SECRET_PARAMS = frozenset({"token", "access_token", "auth", "auth_token", "api_key", "apikey", "key", "password",
                           "pass", "passwd", "pwd", "secret", "client_secret", "sig", "signature",
                           "x-amz-signature", "x-amz-credential",
                           "x-amz-security-token"})

# scheme://user:password@  (the password may not contain '@', '/', or whitespace)
_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:@/\s]*):(?P<pw>[^@/\s]+)@")
# scheme://token@host (a bare secret as userinfo, e.g. https://ghp_xxx@host): keep nothing
_BARE_USER_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:@/\s]{20,})@")
# ?name=value or &name=value with a secret name
_QUERY_RE = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;#\s]+)=(?P<value>[^&;#\s]*)")


def _query(match: re.Match) -> str:
    if match.group("name").lower() in SECRET_PARAMS and match.group("value"):
        return f"{match.group('lead')}{match.group('name')}={MASK}"
    return match.group(0)


def redact(text: str) -> str:
    """`text` with every credential in URIs it contains replaced by ***; other text unchanged."""
    if not isinstance(text, str) or ("://" not in text and "=" not in text):
        return text
    text = _USERINFO_RE.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:{MASK}@", text)
    text = _BARE_USER_RE.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    if "?" in text or "&" in text:
        text = _QUERY_RE.sub(_query, text)
    return text


def redact_tree(obj):
    """A copy of a config dict (or list / str) with every string passed through `redact`."""
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_tree(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(redact_tree(v) for v in obj)
    return redact(obj) if isinstance(obj, str) else obj
