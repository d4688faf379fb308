"""The lab's Windows node stand-in: an SSH endpoint that behaves like Win32-OpenSSH on
Windows Server 2019 with IIS in front of a lab node (see README.md in this folder).

Constants other code needs (inventories, tests) live here.
"""

from __future__ import annotations

# The fake drive's layout (lab/windows/drive.py): these two folders ARE the node's folders.
APP_DIR = "C:/inetpub/wwwroot/SecretServer"  # the node's app/ folder
HOME = "C:/Users/zerodown"  # the node's folder: the login / working directory
SITE = "SecretServer"
APP_POOL = "SecretServer"
# Win32-OpenSSH's realpath form of the home (contrib/win32/win32compat/misc.c realpath()).
SFTP_HOME = "/" + HOME
# The endpoints' names in lab/sshd.py's endpoint list: "win:<node name>".
ENDPOINT_PREFIX = "win:"
# Windows endpoints exist for nodes 1..MAX_NODES (cfg.win_ssh_port(i) = port_base + 90 + i).
MAX_NODES = 9

__all__ = ["APP_DIR", "APP_POOL", "ENDPOINT_PREFIX", "HOME", "MAX_NODES", "SFTP_HOME", "SITE"]
