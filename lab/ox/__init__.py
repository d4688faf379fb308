"""The lab's Open-Xchange stand-in (seed 002, "Upgrading from 7.10.0 without downtimes").

* `lab.ox.configdb`: OX's configuration database (`oxconfigdb`) and the schemata's content
  (`oxschemata`) on the lab MariaDB primary, plus the operations the tools perform.
* `lab.ox.tools`: the command line tools (registerserver, listserver, listdatabase,
  listdatabaseschema, disableschema, enableschema, changeserver, runupdate, upgradeschemata)
  as one Python entry point and installable shell wrappers; lab/ox/README.md lists how they
  follow OX's source.
"""
