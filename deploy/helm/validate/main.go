// Command validate checks Kubernetes manifests against the Kubernetes API
// types, offline: every YAML document of every file is decoded strictly
// (an unknown or misspelt field, a duplicate key or a value of the wrong
// type is an error) into the typed struct of its apiVersion and kind from
// k8s.io/api, or, for a Prometheus Operator ServiceMonitor, into the local
// struct in servicemonitor.go. A kind it has no type for is an error too.
//
// On top of the types, the references inside one file must hold: a
// workload's selector matches its pod labels, probes and Services name
// ports that exist, volume mounts name volumes, a configMap volume names a
// ConfigMap of the file, a Service selects a pod template of the file and
// a ServiceMonitor a Service.
//
// With -outboxd BIN, every ConfigMap key outboxd.yaml is also loaded by
// the relay itself (`outboxd migrate --print`, which validates the whole
// config and prints SQL without connecting anywhere), with the OUTBOXD__…
// and PG… variables that the containers mounting it get from their env and
// from Secrets in the same file.
//
//	go run . [-outboxd target/debug/outboxd] FILE...
//
// Each problem is printed as FILE: document N (Kind name, template): what;
// the exit status is 1 if there is any.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	sigsjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// kinds maps "apiVersion kind" to a new empty typed object.
var kinds = map[string]func() any{
	"v1 ConfigMap":                             func() any { return &corev1.ConfigMap{} },
	"v1 Secret":                                func() any { return &corev1.Secret{} },
	"v1 Service":                               func() any { return &corev1.Service{} },
	"v1 ServiceAccount":                        func() any { return &corev1.ServiceAccount{} },
	"v1 Pod":                                   func() any { return &corev1.Pod{} },
	"apps/v1 Deployment":                       func() any { return &appsv1.Deployment{} },
	"apps/v1 StatefulSet":                      func() any { return &appsv1.StatefulSet{} },
	"apps/v1 DaemonSet":                        func() any { return &appsv1.DaemonSet{} },
	"batch/v1 Job":                             func() any { return &batchv1.Job{} },
	"batch/v1 CronJob":                         func() any { return &batchv1.CronJob{} },
	"policy/v1 PodDisruptionBudget":            func() any { return &policyv1.PodDisruptionBudget{} },
	"networking.k8s.io/v1 NetworkPolicy":       func() any { return &networkingv1.NetworkPolicy{} },
	"rbac.authorization.k8s.io/v1 Role":        func() any { return &rbacv1.Role{} },
	"rbac.authorization.k8s.io/v1 RoleBinding": func() any { return &rbacv1.RoleBinding{} },
	"monitoring.coreos.com/v1 ServiceMonitor":  func() any { return &ServiceMonitor{} },
}

// doc is one decoded document and where it came from.
type doc struct {
	index  int    // 1-based, among the file's non-empty documents
	source string // Helm's "# Source:" template, if any
	kind   string
	name   string
	obj    any
}

func (d doc) String() string {
	s := fmt.Sprintf("document %d (%s %s", d.index, d.kind, d.name)
	if d.source != "" {
		s += ", " + d.source
	}
	return s + ")"
}

// report collects the problems of one file.
type report struct {
	file     string
	problems []string
}

func (r *report) add(where fmt.Stringer, format string, args ...any) {
	prefix := r.file + ": "
	if where != nil {
		prefix += where.String() + ": "
	}
	r.problems = append(r.problems, prefix+fmt.Sprintf(format, args...))
}

type plain string

func (p plain) String() string { return string(p) }

func main() {
	outboxd := flag.String("outboxd", "", "the outboxd binary: load each ConfigMap's outboxd.yaml with `outboxd migrate --print`")
	flag.Parse()
	if flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: validate [-outboxd BIN] FILE...")
		os.Exit(2)
	}
	failed := 0
	for _, file := range flag.Args() {
		r := &report{file: file}
		docs := decodeFile(r)
		if len(r.problems) == 0 {
			// Only on whole files: a document that did not decode would
			// show up again as a missing reference.
			checkReferences(r, docs)
		}
		configs := 0
		if *outboxd != "" && len(r.problems) == 0 {
			configs = checkOutboxdConfigs(r, docs, *outboxd)
		}
		if len(r.problems) > 0 {
			for _, p := range r.problems {
				fmt.Println("FAIL " + p)
			}
			failed++
			continue
		}
		var names []string
		for _, d := range docs {
			names = append(names, d.kind)
		}
		line := fmt.Sprintf("ok   %s: %d documents (%s)", file, len(docs), strings.Join(names, ", "))
		if *outboxd != "" {
			line += fmt.Sprintf("; %d outboxd config(s) load", configs)
		}
		fmt.Println(line)
	}
	if failed > 0 {
		fmt.Printf("%d of %d file(s) failed\n", failed, flag.NArg())
		os.Exit(1)
	}
}

var sourceLine = regexp.MustCompile(`(?m)^# Source: (.+)$`)

// decodeFile splits the file into documents and decodes each strictly.
func decodeFile(r *report) []doc {
	f, err := os.Open(r.file)
	if err != nil {
		r.add(nil, "%v", err)
		return nil
	}
	defer f.Close()
	reader := utilyaml.NewYAMLReader(bufio.NewReader(f))
	var docs []doc
	index := 0
	for {
		raw, err := reader.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			r.add(nil, "cannot split into YAML documents: %v", err)
			return docs
		}
		data, err := yaml.YAMLToJSONStrict(raw)
		if err != nil {
			r.add(plain(fmt.Sprintf("document %d", index+1)), "not valid YAML: %v", err)
			index++
			continue
		}
		if t := bytes.TrimSpace(data); len(t) == 0 || string(t) == "null" {
			continue // only comments
		}
		index++
		d := doc{index: index}
		if m := sourceLine.FindSubmatch(raw); m != nil {
			d.source = string(m[1])
		}
		var head struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
			Metadata   struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if err := json.Unmarshal(data, &head); err != nil {
			r.add(d, "not a Kubernetes object: %v", err)
			continue
		}
		d.kind, d.name = head.Kind, head.Metadata.Name
		newObj, ok := kinds[head.APIVersion+" "+head.Kind]
		if !ok {
			r.add(d, "no API type for apiVersion %q kind %q (a misspelt kind or apiVersion, or one this checker does not know)", head.APIVersion, head.Kind)
			continue
		}
		d.obj = newObj()
		strict, err := sigsjson.UnmarshalStrict(data, d.obj, sigsjson.DisallowUnknownFields, sigsjson.DisallowDuplicateFields)
		if err != nil {
			r.add(d, "%v", err)
			continue
		}
		for _, e := range strict {
			r.add(d, "%v", e)
		}
		if len(strict) > 0 {
			continue
		}
		checkObject(r, d)
		docs = append(docs, d)
	}
	return docs
}

// objectMeta returns the object's metadata.
func objectMeta(obj any) *metav1.ObjectMeta {
	if o, ok := obj.(interface{ GetObjectMeta() metav1.Object }); ok {
		if m, ok := o.GetObjectMeta().(*metav1.ObjectMeta); ok {
			return m
		}
	}
	if sm, ok := obj.(*ServiceMonitor); ok {
		return &sm.ObjectMeta
	}
	return nil
}

// checkObject checks what the API server would refuse in one object alone.
func checkObject(r *report, d doc) {
	meta := objectMeta(d.obj)
	if meta == nil || meta.Name == "" {
		r.add(d, "metadata.name is missing")
		return
	}
	nameCheck := validation.IsDNS1123Subdomain
	if d.kind == "Service" {
		nameCheck = validation.IsDNS1035Label
	}
	for _, msg := range nameCheck(meta.Name) {
		r.add(d, "metadata.name %q: %s", meta.Name, msg)
	}
	checkLabels(r, d, "metadata.labels", meta.Labels)
	for key := range meta.Annotations {
		for _, msg := range validation.IsQualifiedName(key) {
			r.add(d, "metadata.annotations key %q: %s", key, msg)
		}
	}
	if template, selector, path := podTemplate(d.obj); template != nil {
		checkLabels(r, d, path+".metadata.labels", template.Labels)
		if selector != nil {
			checkSelector(r, d, path, selector, template.Labels)
		}
		checkPodSpec(r, d, path+".spec", &template.Spec)
	}
	switch o := d.obj.(type) {
	case *corev1.Pod:
		checkPodSpec(r, d, "spec", &o.Spec)
	case *corev1.Service:
		for i, p := range o.Spec.Ports {
			if p.Port < 1 || p.Port > 65535 {
				r.add(d, "spec.ports[%d].port %d is not a port number", i, p.Port)
			}
		}
	case *policyv1.PodDisruptionBudget:
		if o.Spec.Selector == nil {
			r.add(d, "spec.selector is missing")
		}
		if (o.Spec.MinAvailable == nil) == (o.Spec.MaxUnavailable == nil) {
			r.add(d, "spec: set exactly one of minAvailable and maxUnavailable")
		}
	case *ServiceMonitor:
		checkServiceMonitor(r, d, o)
	}
}

func checkLabels(r *report, d doc, path string, set map[string]string) {
	for key, value := range set {
		for _, msg := range validation.IsQualifiedName(key) {
			r.add(d, "%s key %q: %s", path, key, msg)
		}
		for _, msg := range validation.IsValidLabelValue(value) {
			r.add(d, "%s[%s] value %q: %s", path, key, value, msg)
		}
	}
}

// podTemplate returns a workload's pod template, its selector (nil where
// the API derives it) and the template's field path.
func podTemplate(obj any) (*corev1.PodTemplateSpec, *metav1.LabelSelector, string) {
	switch o := obj.(type) {
	case *appsv1.Deployment:
		return &o.Spec.Template, orMissing(o.Spec.Selector), "spec.template"
	case *appsv1.StatefulSet:
		return &o.Spec.Template, orMissing(o.Spec.Selector), "spec.template"
	case *appsv1.DaemonSet:
		return &o.Spec.Template, orMissing(o.Spec.Selector), "spec.template"
	case *batchv1.Job:
		return &o.Spec.Template, nil, "spec.template"
	case *batchv1.CronJob:
		return &o.Spec.JobTemplate.Spec.Template, nil, "spec.jobTemplate.spec.template"
	}
	return nil, nil, ""
}

// missingSelector stands for a required selector that is absent.
var missingSelector = &metav1.LabelSelector{}

func orMissing(s *metav1.LabelSelector) *metav1.LabelSelector {
	if s == nil {
		return missingSelector
	}
	return s
}

func checkSelector(r *report, d doc, path string, selector *metav1.LabelSelector, podLabels map[string]string) {
	if selector == missingSelector {
		r.add(d, "spec.selector is missing")
		return
	}
	sel, err := metav1.LabelSelectorAsSelector(selector)
	if err != nil {
		r.add(d, "spec.selector: %v", err)
		return
	}
	if sel.Empty() {
		r.add(d, "spec.selector is empty: it would select every pod")
	} else if !sel.Matches(labels.Set(podLabels)) {
		r.add(d, "spec.selector does not match %s.metadata.labels", path)
	}
}

func checkPodSpec(r *report, d doc, path string, spec *corev1.PodSpec) {
	volumes := map[string]bool{}
	for i, v := range spec.Volumes {
		if volumes[v.Name] {
			r.add(d, "%s.volumes[%d]: a second volume named %q", path, i, v.Name)
		}
		volumes[v.Name] = true
	}
	if len(spec.Containers) == 0 {
		r.add(d, "%s.containers is empty", path)
	}
	names := map[string]bool{}
	portNames := map[string]bool{}
	all := append(append([]corev1.Container{}, spec.InitContainers...), spec.Containers...)
	for i, c := range all {
		cpath := fmt.Sprintf("%s.containers[%d]", path, i-len(spec.InitContainers))
		if i < len(spec.InitContainers) {
			cpath = fmt.Sprintf("%s.initContainers[%d]", path, i)
		}
		if c.Name == "" {
			r.add(d, "%s.name is missing", cpath)
		} else if names[c.Name] {
			r.add(d, "%s: a second container named %q", cpath, c.Name)
		}
		names[c.Name] = true
		if c.Image == "" {
			r.add(d, "%s (%s): image is missing", cpath, c.Name)
		}
		own := map[string]bool{}
		for j, p := range c.Ports {
			if p.ContainerPort < 1 || p.ContainerPort > 65535 {
				r.add(d, "%s.ports[%d].containerPort %d is not a port number", cpath, j, p.ContainerPort)
			}
			if p.Name == "" {
				continue
			}
			for _, msg := range validation.IsValidPortName(p.Name) {
				r.add(d, "%s.ports[%d].name %q: %s", cpath, j, p.Name, msg)
			}
			if portNames[p.Name] {
				r.add(d, "%s.ports[%d]: port name %q is used by another container of the pod", cpath, j, p.Name)
			}
			own[p.Name] = true
			portNames[p.Name] = true
		}
		for j, m := range c.VolumeMounts {
			if !volumes[m.Name] {
				r.add(d, "%s.volumeMounts[%d]: no volume named %q in %s.volumes", cpath, j, m.Name, path)
			}
		}
		for _, probe := range []struct {
			field string
			p     *corev1.Probe
		}{{"startupProbe", c.StartupProbe}, {"livenessProbe", c.LivenessProbe}, {"readinessProbe", c.ReadinessProbe}} {
			if probe.p == nil || probe.p.HTTPGet == nil {
				continue
			}
			port := probe.p.HTTPGet.Port
			if port.Type == intstr.String && !own[port.StrVal] {
				r.add(d, "%s.%s.httpGet.port: container %q has no port named %q", cpath, probe.field, c.Name, port.StrVal)
			}
			if !strings.HasPrefix(probe.p.HTTPGet.Path, "/") {
				r.add(d, "%s.%s.httpGet.path %q does not start with /", cpath, probe.field, probe.p.HTTPGet.Path)
			}
		}
	}
}

// pods are the pod templates of a file, with where they are.
type pod struct {
	doc    doc
	labels map[string]string
	spec   *corev1.PodSpec
}

func podsOf(docs []doc) []pod {
	var pods []pod
	for _, d := range docs {
		if t, _, _ := podTemplate(d.obj); t != nil {
			pods = append(pods, pod{d, t.Labels, &t.Spec})
		} else if p, ok := d.obj.(*corev1.Pod); ok {
			pods = append(pods, pod{d, p.Labels, &p.Spec})
		}
	}
	return pods
}

// checkReferences checks what objects of one file say about each other.
func checkReferences(r *report, docs []doc) {
	pods := podsOf(docs)
	configMaps := map[string]bool{}
	var services []*corev1.Service
	for _, d := range docs {
		switch o := d.obj.(type) {
		case *corev1.ConfigMap:
			configMaps[o.Name] = true
		case *corev1.Service:
			services = append(services, o)
		}
	}
	for _, p := range pods {
		for i, v := range p.spec.Volumes {
			cm := v.ConfigMap
			if cm != nil && !(cm.Optional != nil && *cm.Optional) && !configMaps[cm.Name] {
				r.add(p.doc, "volumes[%d] (%s): no ConfigMap named %q in this file", i, v.Name, cm.Name)
			}
		}
	}
	for _, d := range docs {
		switch o := d.obj.(type) {
		case *corev1.Service:
			if len(o.Spec.Selector) == 0 {
				continue // endpoints managed elsewhere
			}
			var selected []pod
			for _, p := range pods {
				if labels.SelectorFromSet(o.Spec.Selector).Matches(labels.Set(p.labels)) {
					selected = append(selected, p)
				}
			}
			if len(selected) == 0 {
				r.add(d, "spec.selector %v matches no pod template in this file", o.Spec.Selector)
				continue
			}
			for i, port := range o.Spec.Ports {
				if port.TargetPort.Type != intstr.String {
					continue
				}
				for _, p := range selected {
					if !hasPortNamed(p.spec, port.TargetPort.StrVal) {
						r.add(d, "spec.ports[%d].targetPort: the pods of %s have no port named %q", i, p.doc, port.TargetPort.StrVal)
					}
				}
			}
		case *policyv1.PodDisruptionBudget:
			if o.Spec.Selector == nil {
				continue
			}
			sel, err := metav1.LabelSelectorAsSelector(o.Spec.Selector)
			if err != nil {
				continue // reported by checkObject
			}
			if !anyPod(pods, sel) {
				r.add(d, "spec.selector matches no pod template in this file")
			}
		case *ServiceMonitor:
			sel, err := metav1.LabelSelectorAsSelector(&o.Spec.Selector)
			if err != nil {
				continue
			}
			matched := false
			for _, s := range services {
				if !sel.Matches(labels.Set(s.Labels)) {
					continue
				}
				matched = true
				for i, e := range o.Spec.Endpoints {
					if e.Port != "" && !servicePortNamed(s, e.Port) {
						r.add(d, "spec.endpoints[%d].port: Service %s has no port named %q", i, s.Name, e.Port)
					}
				}
			}
			if !matched {
				r.add(d, "spec.selector matches no Service in this file")
			}
		}
	}
}

func anyPod(pods []pod, sel labels.Selector) bool {
	for _, p := range pods {
		if sel.Matches(labels.Set(p.labels)) {
			return true
		}
	}
	return false
}

func hasPortNamed(spec *corev1.PodSpec, name string) bool {
	for _, c := range spec.Containers {
		for _, p := range c.Ports {
			if p.Name == name {
				return true
			}
		}
	}
	return false
}

func servicePortNamed(s *corev1.Service, name string) bool {
	for _, p := range s.Spec.Ports {
		if p.Name == name {
			return true
		}
	}
	return false
}

// outboxdEnv is what a relay reads from its environment.
var outboxdEnv = regexp.MustCompile(`^(OUTBOXD__[A-Z0-9_]+|PG[A-Z]+)$`)

// checkOutboxdConfigs loads every ConfigMap's outboxd.yaml with the relay,
// under the environment of each container that mounts it (or none, when no
// container of the file does). It returns how many loads passed.
func checkOutboxdConfigs(r *report, docs []doc, binary string) int {
	secrets := map[string]map[string]string{}
	for _, d := range docs {
		if s, ok := d.obj.(*corev1.Secret); ok {
			values := map[string]string{}
			for k, v := range s.Data {
				values[k] = string(v)
			}
			for k, v := range s.StringData {
				values[k] = v
			}
			secrets[s.Name] = values
		}
	}
	pods := podsOf(docs)
	passed := 0
	for _, d := range docs {
		cm, ok := d.obj.(*corev1.ConfigMap)
		if !ok {
			continue
		}
		text, ok := cm.Data["outboxd.yaml"]
		if !ok {
			continue
		}
		type run struct {
			who string
			env []string
		}
		var runs []run
		for _, p := range pods {
			for _, volume := range p.spec.Volumes {
				if volume.ConfigMap == nil || volume.ConfigMap.Name != cm.Name {
					continue
				}
				for _, c := range p.spec.Containers {
					if !mounts(c, volume.Name) {
						continue
					}
					env, notes := containerEnv(c, secrets)
					for _, n := range notes {
						fmt.Printf("note %s: %s, container %s: %s\n", r.file, p.doc, c.Name, n)
					}
					runs = append(runs, run{fmt.Sprintf("as container %s of %s", c.Name, p.doc), env})
				}
			}
		}
		if len(runs) == 0 {
			runs = append(runs, run{"with no environment (no container of this file mounts it)", nil})
		}
		for _, run := range runs {
			if err := loadConfig(binary, text, run.env); err != nil {
				r.add(d, "outboxd.yaml does not load %s: %v", run.who, err)
			} else {
				passed++
			}
		}
	}
	return passed
}

func mounts(c corev1.Container, volume string) bool {
	for _, m := range c.VolumeMounts {
		if m.Name == volume {
			return true
		}
	}
	return false
}

// containerEnv is the OUTBOXD__… and PG… environment a container gets from
// literal values and from Secrets of this file; notes say what it cannot
// know (a Secret from elsewhere, a value from a field reference).
func containerEnv(c corev1.Container, secrets map[string]map[string]string) ([]string, []string) {
	values := map[string]string{}
	var notes []string
	for _, from := range c.EnvFrom {
		if from.SecretRef == nil {
			continue
		}
		s, ok := secrets[from.SecretRef.Name]
		if !ok {
			notes = append(notes, fmt.Sprintf("Secret %q is not in this file (an existing Secret); its overrides are not checked", from.SecretRef.Name))
			continue
		}
		for k, v := range s {
			values[from.Prefix+k] = v
		}
	}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom == nil:
			values[e.Name] = e.Value
		case e.ValueFrom.SecretKeyRef != nil && secrets[e.ValueFrom.SecretKeyRef.Name] != nil:
			values[e.Name] = secrets[e.ValueFrom.SecretKeyRef.Name][e.ValueFrom.SecretKeyRef.Key]
		case outboxdEnv.MatchString(e.Name):
			notes = append(notes, fmt.Sprintf("%s comes from a reference this check cannot follow", e.Name))
		}
	}
	var env []string
	for k, v := range values {
		if outboxdEnv.MatchString(k) {
			env = append(env, k+"="+v)
		}
	}
	sort.Strings(env)
	return env, notes
}

// loadConfig runs `outboxd migrate --print` on the config text: it loads
// and validates the config as every command does, then prints SQL without
// connecting to anything.
func loadConfig(binary, text string, env []string) error {
	dir, err := os.MkdirTemp("", "outboxd-helm-config-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "outboxd.yaml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		return err
	}
	cmd := exec.Command(binary, "migrate", "--print", "--config", path)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir}, env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.Stdout = io.Discard
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%v: %s", err, strings.TrimSpace(stderr.String()))
	}
	return nil
}
