// CoreDNS with the plugins a cluster's DNS needs for the suite's pods, built from its Go
// module like the control plane (tests/harness/clusterdns.py): the kubernetes plugin answers
// Service and pod names (a headless Service's <hostname>.<service>.<namespace>.svc) from the
// API server; bind keeps it on its own address. Only these plugins: a fraction of the build.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	// The plugins, registered by import; the order of Directives is the order of execution.
	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
)

func init() {
	dnsserver.Directives = []string{"bind", "errors", "log", "kubernetes"}
}

func main() {
	coremain.Run()
}
