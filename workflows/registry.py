"""Every procedure zerodown knows, by the name users type (`zerodown start <procedure>`)."""

from workflows.rolling_deploy import RollingDeployInput, RollingDeployResult, RollingDeployWorkflow
from workflows.ss_rolling import SsRollingInput, SsRollingResult, SsRollingWorkflow

PROCEDURES: dict[str, type] = {"rolling-deploy": RollingDeployWorkflow, "ss-rolling": SsRollingWorkflow}
INPUTS: dict[str, type] = {"rolling-deploy": RollingDeployInput, "ss-rolling": SsRollingInput}
RESULTS: dict[str, type] = {"rolling-deploy": RollingDeployResult, "ss-rolling": SsRollingResult}
ALL_WORKFLOWS: list[type] = list(PROCEDURES.values())
