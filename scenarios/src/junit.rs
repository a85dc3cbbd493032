//! JUnit XML for CI systems: one test suite, one test case per scenario.

use std::path::Path;

use quick_junit::{NonSuccessKind, Report as JUnit, TestCase, TestCaseStatus, TestSuite};

use crate::runner::{Outcome, Report};

/// Renders `reports` as JUnit XML.
pub fn render(reports: &[Report]) -> anyhow::Result<String> {
    let mut junit = JUnit::new("kiln-scenarios");
    let mut suite = TestSuite::new("scenarios");
    for r in reports {
        let status = match &r.outcome {
            Outcome::Passed => TestCaseStatus::success(),
            Outcome::Skipped(why) => {
                let mut s = TestCaseStatus::skipped();
                s.set_message(why.as_str());
                s
            }
            Outcome::Failed {
                step,
                reason,
                artifacts,
            } => {
                let mut s = TestCaseStatus::non_success(NonSuccessKind::Failure);
                s.set_message(format!("step \"{step}\": {reason}"));
                s.set_description(format!("crash dump: {}", artifacts.display()));
                s
            }
        };
        let mut case = TestCase::new(format!("{}::{}", r.provisioner, r.scenario), status);
        case.set_classname("kiln.scenarios");
        case.set_time(r.duration);
        let steps: Vec<String> = r
            .steps
            .iter()
            .map(|s| {
                format!(
                    "{} ({:.1}s){}{}",
                    s.description,
                    s.duration.as_secs_f64(),
                    if s.detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", s.detail)
                    },
                    s.error
                        .as_ref()
                        .map(|e| format!(" FAILED: {e}"))
                        .unwrap_or_default()
                )
            })
            .collect();
        case.set_system_out(steps.join("\n"));
        suite.add_test_case(case);
    }
    junit.add_test_suite(suite);
    Ok(junit.to_string()?)
}

/// Writes JUnit XML to `path`.
pub fn write(reports: &[Report], path: &Path) -> anyhow::Result<()> {
    std::fs::write(path, render(reports)?)?;
    Ok(())
}
