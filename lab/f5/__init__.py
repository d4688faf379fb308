"""The lab's F5 BIG-IP: an iControl REST server (HTTPS) answering the paths, bodies and
errors a drain/enable automation meets on a BIG-IP, with the lab's real HAProxy doing the
work behind it: a PATCH of a pool member becomes `set server <backend>/<server> state
ready|drain|maint` on HAProxy's runtime API, and a member's state and statistics are read
from HAProxy (`show servers state`, `show stat`).

Modules: facts (BIG-IP's constants, texts and error shapes), tokens (login tokens), ltm
(pools, members, statistics), runtime (HAProxy's runtime API), config (the files), tls (the
lab CA and certificate), server (the aiohttp app), lab (start / stop / status / the restart
switch), __main__ (`python -m lab.f5`).

Every BIG-IP fact is taken from public sources, cited next to it:

* F5's Ansible collection, F5Networks/f5-ansible: plugins/module_utils/bigip.py and
  constants.py (token login, token PATCH, "Configuration Utility restarting..." retry,
  basic auth fallback), plugins/modules/bigip_pool_member.py (session/state pairs for
  enabled, disabled, forced offline and how they read back), plugins/modules/bigip_pool.py
  (serviceDownAction values), tests/unit/.../fixtures/load_ltm_pool.json and
  pool_members_subcollection.json (the pool and member bodies); issues #269, #1105, #2199.
* F5's Python SDK, F5Networks/f5-common-python: f5/bigip/tm/ltm/pool.py (accepted member
  session/state values), its functional tests (01020036:3 not-found texts, "unchecked"
  without a monitor), f5/utils/responses/handlers.py (nestedStats).
* F5Networks/f5-telemetry-streaming test/unit/data/propertiesJsonTests/collectPools.js (a
  pool member's stats entries and status reasons).
* f5devcentral/f5-bigip-rest-go bigip/utils.go (BIG-IP's answers while restjavad or mcpd
  restarts, "Public URI path not registered", the no-credentials 401);
  f5devcentral/f5-automation-labs docs/lab-1/authentication.rst (login and token PATCH
  bodies); electric-cloud-community/EC-BigIp specs (pool member not-found and 400 texts).
* DevCentral, "iControl REST Authentication Token Management" (community.f5.com/kb/
  technicalarticles/icontrol-rest-authentication-token-management/287462): 1200 s default,
  36000 s cap and its 406 text, 100 tokens per user (admin exempt) and the 400 text; F5
  K44237337 / K59142111 (the per-user limit and its message) as quoted in f5-ansible #269.
* Issue threads quoting BIG-IP's answers: f5devcentral/f5-cli #8 and #10, joel74/
  POSH-LTM-Rest #147, F5Networks/terraform-provider-bigip #469, f5-common-python #1324.

What is the lab's own (no public source found; see the comments): the wrong-password
message ("Authentication failed."), the HTML page around "Configuration Utility
restarting...", the wording of a few 400/404 texts (invalid property value, unknown token
on /mgmt/shared/authz/tokens, unmodelled properties), and the restart switch itself.
"""
