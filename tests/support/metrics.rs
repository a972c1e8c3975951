//! Reading a relay's `/metrics` text the way Prometheus does: parsed as
//! OpenMetrics (so a malformed exposition fails the test), never by matching
//! lines.

use openmetrics_parser::{MetricNumber, OpenMetricsValue};

/// The value of every sample of `family` matching `label` (if given), summed.
pub fn sum(text: &str, family: &str, label: Option<(&str, &str)>) -> f64 {
    let exposition =
        openmetrics_parser::openmetrics::parse_openmetrics(text).expect("valid OpenMetrics");
    let Some(family) = exposition.families.get(family) else {
        return 0.0;
    };
    family
        .iter_samples()
        .filter(|sample| match label {
            None => true,
            Some((name, value)) => sample
                .get_labelset()
                .map(|labels| labels.get_label_value(name) == Some(value))
                .unwrap_or(false),
        })
        .map(|sample| match &sample.value {
            OpenMetricsValue::Counter(counter) => number(&counter.value),
            OpenMetricsValue::Gauge(gauge) => number(gauge),
            OpenMetricsValue::Histogram(histogram) => histogram.count.unwrap_or(0) as f64,
            OpenMetricsValue::Info => 1.0,
            _ => 0.0,
        })
        .sum()
}

fn number(value: &MetricNumber) -> f64 {
    match value {
        MetricNumber::Int(i) => *i as f64,
        MetricNumber::Float(f) => *f,
    }
}
