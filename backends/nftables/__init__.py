"""The nftables backend (installed as ``meshintercept.backends.nftables``).

* `interceptor`: the `Interceptor` for ``--mode nftables``;
* `ruleset`: our table as pure data (transaction, dry-run text, the comparison status makes);
* `table`: reading, replacing and removing the table inside a namespace;
* `lib`: libnftables through python3-nftables, and what its failures mean;
* `others`: other tools' redirect rules in a namespace (nft and legacy iptables);
* `probe`: the self-test in a throwaway namespace, the node's netfilter flavours, the advice.
"""

from .interceptor import NftablesInterceptor

__all__ = ["NftablesInterceptor"]
