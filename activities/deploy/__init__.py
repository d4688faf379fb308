"""Release packages and the node's application folder: inspect, back up, deploy, restore.

One module per job:

    versions.py      version rules: parse_version, compare_versions, version_guard (the
                     seed's "Version Guard") and its VersionGuardVerdict
    package.py       package inspection: inspect_package_file and the inspect_package
                     activity, PackageInfo, MigrationSpec, the corrupt-zip checks
    merge.py         the `key = value` config merge: parsing a settings file, merging a
                     node's customisations onto new defaults, the merged text and its diff
    appfolder.py     the node's application folder over SSH: backup_app_folder,
                     deploy_package, restore_app_folder, folder_manifest, AppBackup,
                     DeployRequest (and zerodown's `.zerodown` layout on the node)
    secretserver.py  the Secret Server builders on the worker: build_upgrade_zip (a package
                     of what differs from a node) and generate_sql_script (the upgrade SQL)

Imports go one way: package uses versions, appfolder uses package and merge, secretserver
uses package and appfolder (versions names PackageInfo for type checking only). Every name
the workflows, the starter, bench, lab and the tests use is re-exported here, so
`import activities.deploy as deploy; deploy.X` works as it did for the single module.
Workflows also import the submodules holding their dataclasses (see rolling_deploy.py):
the sandbox resolves a dataclass's type hints through sys.modules[its module].
"""

from __future__ import annotations

# Private names the tests reach as `deploy._X`.
from activities.deploy.appfolder import _CURRENT as _CURRENT
from activities.deploy.appfolder import _TARLIST as _TARLIST
from activities.deploy.appfolder import (
    BACKUPS,
    CMD_TIMEOUT_S,
    DEFAULTS,
    RELEASES,
    ZD,
    AppBackup,
    AppBackupRequest,
    AppRestoreResult,
    DeployRequest,
    DeployResult,
    MergeReport,
    NodeRequest,
    backup_app,
    backup_app_folder,
    deploy,
    deploy_package,
    diff_path_for,
    folder_manifest,
    parse_sha256sum,
    restore_app,
    restore_app_folder,
)
from activities.deploy.merge import MergeOutcome, NotKeyValueError, merge_config, merge_config_detailed
from activities.deploy.package import (
    MigrationSpec,
    PackageInfo,
    PackageRequest,
    database_problem,
    inspect_package,
    inspect_package_file,
)
from activities.deploy.secretserver import (
    SqlScript,
    SqlScriptRequest,
    UpgradeZip,
    UpgradeZipRequest,
    build_upgrade_zip,
    build_zip,
    generate_script,
    generate_sql_script,
    sql_script_text,
)
from activities.deploy.versions import VersionGuardVerdict, compare_versions, parse_version, version_guard

__all__ = [
    "BACKUPS",
    "CMD_TIMEOUT_S",
    "DEFAULTS",
    "RELEASES",
    "ZD",
    "AppBackup",
    "AppBackupRequest",
    "AppRestoreResult",
    "DeployRequest",
    "DeployResult",
    "MergeOutcome",
    "MergeReport",
    "MigrationSpec",
    "NodeRequest",
    "NotKeyValueError",
    "PackageInfo",
    "PackageRequest",
    "SqlScript",
    "SqlScriptRequest",
    "UpgradeZip",
    "UpgradeZipRequest",
    "VersionGuardVerdict",
    "backup_app",
    "backup_app_folder",
    "build_upgrade_zip",
    "build_zip",
    "compare_versions",
    "database_problem",
    "deploy",
    "deploy_package",
    "diff_path_for",
    "folder_manifest",
    "generate_script",
    "generate_sql_script",
    "inspect_package",
    "inspect_package_file",
    "merge_config",
    "merge_config_detailed",
    "parse_sha256sum",
    "parse_version",
    "restore_app",
    "restore_app_folder",
    "sql_script_text",
    "version_guard",
]
