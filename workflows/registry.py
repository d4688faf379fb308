"""Every procedure zerodown knows, by the name users type (`zerodown start <procedure>`)."""

from workflows.rolling_deploy import RollingDeployInput, RollingDeployResult, RollingDeployWorkflow

PROCEDURES: dict[str, type] = {"rolling-deploy": RollingDeployWorkflow}
INPUTS: dict[str, type] = {"rolling-deploy": RollingDeployInput}
RESULTS: dict[str, type] = {"rolling-deploy": RollingDeployResult}
ALL_WORKFLOWS: list[type] = list(PROCEDURES.values())
