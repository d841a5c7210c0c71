// Validates the chart's custom resources against their CRD schemas, as
// packaged by @kubernetes-models: KEDA (ScaledObject, TriggerAuthentication,
// ClusterTriggerAuthentication) and the Prometheus Operator (PodMonitor,
// ServiceMonitor, PrometheusRule). Usage: node validate-crds.mjs FILE.json...
// Each FILE holds a JSON array of Kubernetes objects; built-in API groups
// are ignored (kubernetes-validate checks those). An object of any other
// group or kind is an error: nothing here may go unchecked. Exits 1 if any
// object is invalid, 2 on bad usage; prints one line per object checked.
import { readFileSync } from "node:fs";
import {
  ScaledObject,
  TriggerAuthentication,
  ClusterTriggerAuthentication,
} from "@kubernetes-models/keda/keda.sh/v1alpha1";
import { PodMonitor, ServiceMonitor, PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const models = {
  "keda.sh/v1alpha1": { ScaledObject, TriggerAuthentication, ClusterTriggerAuthentication },
  "monitoring.coreos.com/v1": { PodMonitor, ServiceMonitor, PrometheusRule },
};
// Built-in groups (no dot, or *.k8s.io): kubernetes-validate's business.
const builtin = (apiVersion) => !apiVersion.includes(".") || /\.k8s\.io\//.test(apiVersion);
const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node validate-crds.mjs FILE.json...");
  process.exit(2);
}
let checked = 0;
let failed = 0;
for (const file of files) {
  for (const object of JSON.parse(readFileSync(file, "utf8"))) {
    if (!object || builtin(String(object.apiVersion))) continue;
    const Model = models[object.apiVersion]?.[object.kind];
    const name = `${file}: ${object.kind}/${object.metadata?.name}`;
    if (!Model) {
      console.error(`${name}: no schema for this apiVersion and kind`);
      failed++;
      continue;
    }
    try {
      new Model(object).validate();
      console.log(`${name}: valid`);
    } catch (error) {
      console.error(`${name}: INVALID: ${error.message}`);
      failed++;
    }
    checked++;
  }
}
if (failed > 0) process.exit(1);
console.log(`custom resources: ${checked} object(s) valid`);
