"""Every procedure zerodown knows, by the name users type (`zerodown start <procedure>`)."""

from workflows.rolling_deploy import RollingDeployInput, RollingDeployWorkflow

PROCEDURES: dict[str, type] = {"rolling-deploy": RollingDeployWorkflow}
INPUTS: dict[str, type] = {"rolling-deploy": RollingDeployInput}
ALL_WORKFLOWS: list[type] = list(PROCEDURES.values())
