"""What BIG-IP's iControl REST says, as constants and body builders: the auth side
(restjavad: /mgmt/shared/...) and the error shapes of both of its layers.

Every value here comes from a public source named in the comment next to it; where no
source was found the comment says so and names the value as the lab's own choice.
"""

from __future__ import annotations

import hashlib
import itertools
import uuid
from datetime import datetime
from typing import Any

# The version the stand-in reports in every selfLink (`?ver=`). A lab choice: any TMOS
# 12.1+ answers these paths; the captures cited below carry 14.1.x and 15.1.x.
TMOS_VERSION = "15.1.10"
PARTITION = "Common"

# ---------------------------------------------------------------------------- tokens
# Token login, body {"username", "password", "loginProviderName": "tmos"}:
# f5-ansible plugins/module_utils/constants.py (LOGIN, LOGOUT) and module_utils/bigip.py
# (connect_via_token_auth; `auth_provider or 'tmos'`).
LOGIN_PATH = "/mgmt/shared/authn/login"
TOKENS_PATH = "/mgmt/shared/authz/tokens"
LOGIN_PROVIDER = "tmos"
# "By default, a token expires after 1,200s (20 min) ... The maximum lifespan is 36,000s
# (10 hrs). If you attempt to change the timeout property longer than the maximum, you will
# get the 406 error "Auth-token absolute timeout (36000 seconds) exceeded"" - DevCentral,
# "iControl REST Authentication Token Management" (community.f5.com/kb/technicalarticles/
# icontrol-rest-authentication-token-management/287462); also F5 staff in f5-ansible #2199.
DEFAULT_TOKEN_TIMEOUT_S = 1200
MAX_TOKEN_TIMEOUT_S = 36000
TIMEOUT_EXCEEDED_STATUS = 406
TIMEOUT_EXCEEDED_MESSAGE = f"Auth-token absolute timeout ({MAX_TOKEN_TIMEOUT_S} seconds) exceeded"
# "Each user can request up to 100 tokens at any point in time. Your 101-th token request
# will be rejected with the 400 error "... user xxx has reached maximum active login tokens"
# ... The only exception is the "admin" user." - the same DevCentral article; the limit of
# 100 also in f5devcentral/application-study-tool #125, the 400 body in #105 there.
MAX_TOKENS_PER_USER = 100
TOKEN_LIMIT_EXEMPT_USER = "admin"
# The token item: field names, kind, selfLink and the startTime format from the login
# answers quoted in f5devcentral/f5-automation-labs docs/lab-1/authentication.rst and in
# the DevCentral "Demystifying iControl REST Part 6" capture (token 26 upper-case base32
# characters, "partition": "[All]", expirationMicros = start + timeout, in microseconds).
TOKEN_KIND = "shared:authz:tokens:authtokenitemstate"
# The tmos login provider's link, as BIG-IP answers it (loginReference of a tmos login,
# quoted in a public BIG-IP client's test template found by text search).
TMOS_LOGIN_REFERENCE = (
    "https://localhost/mgmt/cm/system/authn/providers/tmos/1f44a60e-11a7-3c51-a49f-82983026b41b/login"
)

# ---------------------------------------------------------------------------- auth errors
# A 401 from BIG-IP carries the reason phrase "F5 Authorization Required" ("HTTP response:
# 401 F5 Authorization Required" on /mgmt/shared/authn/login in f5devcentral/f5-cli #10;
# "401 Unexpected Error: F5 Authorization Required" in f5-common-python #1324).
AUTH_REASON = "F5 Authorization Required"
# Unknown and expired tokens on any call: "X-F5-Auth-Token does not exist." (joel74/
# POSH-LTM-Rest #147) and "X-F5-Auth-Token has expired." (f5devcentral/f5-cli #8, with the
# whole body: code, message, referer, restOperationId, kind ":resterrorresponse").
TOKEN_UNKNOWN_MESSAGE = "X-F5-Auth-Token does not exist."
TOKEN_EXPIRED_MESSAGE = "X-F5-Auth-Token has expired."
# Wrong username or password at the login. NO public capture of this text was found; the
# body's shape (originalRequestBody without the password) is BIG-IP's login error as quoted
# in f5-ansible #1105. The message is the lab's choice - see the report of lab/f5.
LOGIN_FAILED_MESSAGE = "Authentication failed."


def no_credentials_message(path: str, referer: str) -> str:
    """A call with neither a token nor basic auth: F5Networks/terraform-provider-bigip #469
    and f5devcentral/f5-bigip-rest-go bigip/utils.go (restjavad answers it on its own port
    8100, so the Uri names localhost:8100)."""
    return (
        "Authorization failed: no user authentication header or token detected. "
        f"Uri:http://localhost:8100{path} Referrer:{referer} Sender:{referer}"
    )


def token_limit_message(username: str) -> str:
    """The 101st login: "user 21232f29-7a57-35a7-8389-4a0e4a801fc3 has reached maximum
    active login tokens" (F5 K59142111, as quoted in f5-ansible #269): the user is named by
    a name-based UUID, which for "admin" is md5("admin") with the version-3 bits set."""
    return f"user {user_uuid(username)} has reached maximum active login tokens"


def user_uuid(username: str) -> str:
    # md5 of the name with version and variant bits: how K59142111's UUID for admin is made.
    return str(uuid.UUID(bytes=hashlib.md5(username.encode()).digest(), version=3))


# ---------------------------------------------------------------------------- tm errors
# The configuration layer (icrd / mcpd) answers {"code", "message", "errorStack": [],
# "apiError"}: "01020036:3: The requested Pool (/Common/my-pool) was not found." (404,
# apiError 3) in f5devcentral/f5-bigip-rest-go bigip/utils.go; the pool member variant
# "01020036:3: The requested Pool Member (/PART/POOL /PART/1.1.1.1 80) was not found." in
# electric-cloud-community/EC-BigIp's specs, also for a member of a pool that does not exist.
NOT_FOUND_API_ERROR = 3
# Bad bodies, 400: "Found invalid JSON body in the request." (apiError 1, a captured
# BIG-IP answer in a public F5 SE note); "one or more properties must be specified"
# (apiError 26214401, EC-BigIp specs).
INVALID_JSON_MESSAGE = "Found invalid JSON body in the request."
INVALID_JSON_API_ERROR = 1
NO_PROPERTIES_MESSAGE = "one or more properties must be specified"
BAD_REQUEST_API_ERROR = 26214401
# mcpd restarting: 500 {"code":500,"message":"The connection to mcpd has been lost, try
# again.","errorStack":[],"apiError":32768001} (f5-bigip-rest-go bigip/utils.go, "restart
# mcpd"). The lab also answers it when HAProxy's runtime API does not (the daemon doing the
# work is gone).
MCPD_LOST_MESSAGE = "The connection to mcpd has been lost, try again."
MCPD_LOST_API_ERROR = 32768001
# restjavad restarting: 503 and a long HTML page with "Configuration Utility
# restarting..." (f5-bigip-rest-go bigip/utils.go "restart restjavad"; f5-ansible
# module_utils/bigip.py retries a login whose answer contains that text). The page
# around the sentence is the lab's: BIG-IP's own page was not found.
RESTARTING_TEXT = "Configuration Utility restarting..."
RESTARTING_PAGE = f"""<!DOCTYPE html>
<html>
<head><title>BIG-IP&reg; - Configuration Utility</title></head>
<body>
<div id="message">{RESTARTING_TEXT}</div>
<p>The BIG-IP Configuration Utility is restarting. Please wait and try again.</p>
</body>
</html>
"""
# An URI the REST framework does not serve: "Public URI path not registered:
# /tm/ltm/pool/?Common?my-pool" (f5-bigip-rest-go bigip/utils.go), the path without /mgmt.
UNREGISTERED_MESSAGE = "Public URI path not registered: {path}"

_operation_ids = itertools.count(1000)


def rest_error(code: int, message: str, referer: str, **extra: Any) -> dict[str, Any]:
    """restjavad's error body (authn, authz, framework): code, message, referer,
    restOperationId, kind ":resterrorresponse" (f5-cli #8, f5-ansible #1105)."""
    return {
        "code": code,
        "message": message,
        **extra,
        "referer": referer,
        "restOperationId": next(_operation_ids),
        "kind": ":resterrorresponse",
    }


def tm_error(code: int, message: str, api_error: int) -> dict[str, Any]:
    """The configuration layer's error body (see NOT_FOUND_API_ERROR's sources)."""
    return {"code": code, "message": message, "errorStack": [], "apiError": api_error}


def pool_not_found(pool: str, partition: str = PARTITION) -> str:
    return f"01020036:3: The requested Pool (/{partition}/{pool}) was not found."


def member_not_found(pool: str, node: str, port: str, partition: str = PARTITION) -> str:
    where = f"/{partition}/{pool} /{partition}/{node} {port}"
    return f"01020036:3: The requested Pool Member ({where}) was not found."


# ---------------------------------------------------------------------------- token bodies


def micros(t: float) -> int:
    return int(t * 1_000_000)


def start_time_text(t: float) -> str:
    """BIG-IP's startTime: local time with milliseconds and a numeric offset,
    "2024-07-11T02:22:15.666-0700" (Demystifying iControl REST Part 6 capture)."""
    dt = datetime.fromtimestamp(t).astimezone()
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}" + dt.strftime("%z")


def token_self_link(token: str) -> str:
    return f"https://localhost{TOKENS_PATH}/{token}"
