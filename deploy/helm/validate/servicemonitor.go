package main

import (
	"regexp"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// ServiceMonitor is the part of the Prometheus Operator's
// monitoring.coreos.com/v1 ServiceMonitor that outboxd's manifests may use,
// with the operator's field names. Decoded strictly, a field not listed
// here is an error: add it (with the operator's name) when a manifest
// needs it.
type ServiceMonitor struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              ServiceMonitorSpec `json:"spec"`
}

type ServiceMonitorSpec struct {
	JobLabel          string               `json:"jobLabel,omitempty"`
	TargetLabels      []string             `json:"targetLabels,omitempty"`
	PodTargetLabels   []string             `json:"podTargetLabels,omitempty"`
	Endpoints         []Endpoint           `json:"endpoints"`
	Selector          metav1.LabelSelector `json:"selector"`
	NamespaceSelector *NamespaceSelector   `json:"namespaceSelector,omitempty"`
	SampleLimit       *uint64              `json:"sampleLimit,omitempty"`
}

type NamespaceSelector struct {
	Any        bool     `json:"any,omitempty"`
	MatchNames []string `json:"matchNames,omitempty"`
}

type Endpoint struct {
	Port              string              `json:"port,omitempty"`
	TargetPort        *intstr.IntOrString `json:"targetPort,omitempty"`
	Path              string              `json:"path,omitempty"`
	Scheme            string              `json:"scheme,omitempty"`
	Params            map[string][]string `json:"params,omitempty"`
	Interval          string              `json:"interval,omitempty"`
	ScrapeTimeout     string              `json:"scrapeTimeout,omitempty"`
	HonorLabels       bool                `json:"honorLabels,omitempty"`
	HonorTimestamps   *bool               `json:"honorTimestamps,omitempty"`
	Relabelings       []RelabelConfig     `json:"relabelings,omitempty"`
	MetricRelabelings []RelabelConfig     `json:"metricRelabelings,omitempty"`
}

type RelabelConfig struct {
	SourceLabels []string `json:"sourceLabels,omitempty"`
	Separator    *string  `json:"separator,omitempty"`
	TargetLabel  string   `json:"targetLabel,omitempty"`
	Regex        string   `json:"regex,omitempty"`
	Modulus      uint64   `json:"modulus,omitempty"`
	Replacement  *string  `json:"replacement,omitempty"`
	Action       string   `json:"action,omitempty"`
}

// promDuration is the pattern the operator's CRD gives its durations.
var promDuration = regexp.MustCompile(`^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$`)

// checkServiceMonitor checks what the operator's CRD schema requires.
func checkServiceMonitor(r *report, d doc, sm *ServiceMonitor) {
	if len(sm.Spec.Endpoints) == 0 {
		r.add(d, "spec.endpoints is empty")
	}
	for i, e := range sm.Spec.Endpoints {
		for field, value := range map[string]string{"interval": e.Interval, "scrapeTimeout": e.ScrapeTimeout} {
			if value != "" && !promDuration.MatchString(value) {
				r.add(d, "spec.endpoints[%d].%s %q is not a Prometheus duration (30s, 1m)", i, field, value)
			}
		}
		if e.Scheme != "" && e.Scheme != "http" && e.Scheme != "https" {
			r.add(d, "spec.endpoints[%d].scheme %q is not http or https", i, e.Scheme)
		}
		if e.Port == "" && e.TargetPort == nil {
			r.add(d, "spec.endpoints[%d]: name a port (or targetPort)", i)
		}
	}
}
