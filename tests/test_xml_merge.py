"""The XML config merge (activities/deploy/xmlmerge.py): a node's appSettings and
connectionStrings customisations carried by key onto a release's web.config, the rest of the
file exactly as the package has it; a file that does not parse refused before anything is
written."""

from __future__ import annotations

import pytest
from temporalio.exceptions import ApplicationError

from activities.deploy.merge import merge_config_detailed

OLD = """<?xml version="1.0" encoding="utf-8"?>
<configuration>
  <!-- Secret Server 11.4 -->
  <appSettings>
    <add key="SessionTimeout" value="20" />
    <add key="Theme" value="light" />
    <add key="ApiEnabled" value="false" />
  </appSettings>
  <connectionStrings>
    <add name="SecretServer" connectionString="Server=sql01;Database=SS;Trusted_Connection=yes"
         providerName="System.Data.SqlClient" />
  </connectionStrings>
  <system.web><compilation debug="false" /></system.web>
</configuration>
"""

NODE = """<?xml version="1.0" encoding="utf-8"?>
<configuration>
  <!-- Secret Server 11.4 -->
  <appSettings>
    <add key="SessionTimeout" value="45" />
    <add key="Theme" value="light" />
    <add key="ApiEnabled" value="false" />
    <add key="NodeBanner" value="Welcome to web-a &amp; friends" />
  </appSettings>
  <connectionStrings>
    <add name="SecretServer" connectionString="Server=sql02;Database=SS;User Id=ss;Password=pw"
         providerName="System.Data.SqlClient" />
  </connectionStrings>
  <system.web><compilation debug="true" /></system.web>
</configuration>
"""

NEW = """<?xml version="1.0" encoding="utf-8"?>
<configuration>
  <!-- Secret Server 11.5: new defaults -->
  <appSettings>
    <add key="SessionTimeout" value="30" />
    <add key="Theme" value="dark" />
    <add key="ApiEnabled" value="false" />
    <add key="NewFeature" value="on" />
  </appSettings>
  <connectionStrings>
    <add name="SecretServer" connectionString="Server=sql01;Database=SS;Trusted_Connection=yes"
         providerName="System.Data.SqlClient" />
  </connectionStrings>
  <system.web><compilation debug="false" targetFramework="4.8" /></system.web>
</configuration>
"""


def test_customised_entries_are_carried_by_key_and_the_rest_is_the_packages() -> None:
    m = merge_config_detailed(NODE, OLD, NEW, name="web.config")
    assert '<add key="SessionTimeout" value="45" />' in m.text  # customised: kept
    assert '<add key="Theme" value="dark" />' in m.text  # not customised: the new default
    assert '<add key="NewFeature" value="on" />' in m.text  # new in the release
    assert '    <add key="NodeBanner" value="Welcome to web-a &amp; friends" />\n  </appSettings>' in m.text
    assert "Server=sql02;Database=SS;User Id=ss;Password=pw" in m.text  # the node's connection string
    # Outside appSettings / connectionStrings the package's text, byte for byte.
    assert '<compilation debug="false" targetFramework="4.8" />' in m.text
    assert "<!-- Secret Server 11.5: new defaults -->" in m.text
    assert sorted(m.carried) == [
        "appSettings:NodeBanner",
        "appSettings:SessionTimeout",
        "connectionStrings:SecretServer",
    ]
    assert m.changed_defaults == ("appSettings:SessionTimeout", "appSettings:Theme")
    assert not any("pw" in line for line in m.carried + m.notes)  # reports name keys only
    unchanged = [line for line in NEW.splitlines() if "SessionTimeout" not in line and "sql01" not in line]
    assert all(line in m.text.splitlines() for line in unchanged)


def test_without_recorded_defaults_only_shared_entries_keep_the_nodes_values() -> None:
    m = merge_config_detailed(NODE, None, NEW, name="web.config")
    assert (
        '<add key="SessionTimeout" value="45" />' in m.text and '<add key="Theme" value="light" />' in m.text
    )
    assert "NodeBanner" not in m.text
    assert any(n.startswith("appSettings:NodeBanner: only on the node") for n in m.notes)


def test_a_file_that_does_not_parse_is_refused_before_anything_is_written() -> None:
    broken = NODE.replace("</appSettings>", "</appSetings>")
    with pytest.raises(ApplicationError) as info:
        merge_config_detailed(broken, OLD, NEW, name="node web-a: web.config")
    assert (
        info.value.type == "MergeUnsupported"
        and "the node's copy does not parse as XML" in info.value.message
    )
    # A file that is not on the node yet: only the new defaults must parse.
    assert merge_config_detailed("", None, NEW, name="web.config").text == NEW
