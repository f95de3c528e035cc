"""The iptables backend (installed as ``meshintercept.backends.iptables``).

* `interceptor`: the `Interceptor` for ``--mode iptables``;
* `rules`: the rule layout as pure data (plan, dry-run, status compare);
* `table`: reading and committing the nat table inside a namespace (python-iptables);
* `iptc_compat`: workarounds for python-iptables' own bugs, each with its reason;
* `probe`: nft rules, other meshes' redirects, the node's iptables variant, the self-test.
"""

from .interceptor import IptablesInterceptor

__all__ = ["IptablesInterceptor"]
