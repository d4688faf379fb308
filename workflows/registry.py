"""Every procedure zerodown knows, by the name users type (`zerodown start <procedure>`)."""

from workflows.major_maintenance_window import (
    MajorMaintenanceInput,
    MajorMaintenanceResult,
    MajorMaintenanceWindowWorkflow,
)
from workflows.minor_blue_green import MinorBlueGreenInput, MinorBlueGreenResult, MinorBlueGreenWorkflow
from workflows.ox_node_upgrade import OxNodeUpgradeInput, OxNodeUpgradeResult, OxNodeUpgradeWorkflow
from workflows.ox_upgradeschemata import (
    OxUpgradeSchemataInput,
    OxUpgradeSchemataResult,
    OxUpgradeSchemataWorkflow,
)
from workflows.rolling_deploy import RollingDeployInput, RollingDeployResult, RollingDeployWorkflow
from workflows.ss_load_balanced import SsLoadBalancedInput, SsLoadBalancedResult, SsLoadBalancedWorkflow
from workflows.ss_rolling import SsRollingInput, SsRollingResult, SsRollingWorkflow

PROCEDURES: dict[str, type] = {
    "rolling-deploy": RollingDeployWorkflow,
    "ss-rolling": SsRollingWorkflow,
    "ss-load-balanced": SsLoadBalancedWorkflow,
    "ox-upgradeschemata": OxUpgradeSchemataWorkflow,
    "ox-node-upgrade": OxNodeUpgradeWorkflow,
    "minor-blue-green": MinorBlueGreenWorkflow,
    "major-maintenance-window": MajorMaintenanceWindowWorkflow,
}
INPUTS: dict[str, type] = {
    "rolling-deploy": RollingDeployInput,
    "ss-rolling": SsRollingInput,
    "ss-load-balanced": SsLoadBalancedInput,
    "ox-upgradeschemata": OxUpgradeSchemataInput,
    "ox-node-upgrade": OxNodeUpgradeInput,
    "minor-blue-green": MinorBlueGreenInput,
    "major-maintenance-window": MajorMaintenanceInput,
}
RESULTS: dict[str, type] = {
    "rolling-deploy": RollingDeployResult,
    "ss-rolling": SsRollingResult,
    "ss-load-balanced": SsLoadBalancedResult,
    "ox-upgradeschemata": OxUpgradeSchemataResult,
    "ox-node-upgrade": OxNodeUpgradeResult,
    "minor-blue-green": MinorBlueGreenResult,
    "major-maintenance-window": MajorMaintenanceResult,
}
ALL_WORKFLOWS: list[type] = list(PROCEDURES.values())
