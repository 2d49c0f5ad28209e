//! The human-readable rendering of a [`Summary`] (`--format text`).

use std::fmt::{self, Write as _};

use super::Summary;

impl Summary {
    /// The human-readable summary: counts, then the listed problems, then the verdict.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_text(&mut s);
        s
    }

    fn write_text(&self, s: &mut String) -> fmt::Result {
        for (name, file) in [
            ("telemetry", &self.telemetry),
            ("decisions", &self.decisions),
        ] {
            writeln!(
                s,
                "{name:<11} {}: {} lines, {} records",
                file.path, file.lines, file.records
            )?;
        }
        let st = &self.requests_by_status;
        write!(
            s,
            "{:<11} ok {}, error {}, denied {}, cancelled {}, unanswered {}",
            "requests", st.ok, st.error, st.denied, st.cancelled, st.unanswered
        )?;
        if st.unknown > 0 {
            write!(s, ", unknown {}", st.unknown)?;
        }
        writeln!(s)?;
        let v = &self.decisions_by_verdict;
        write!(
            s,
            "{:<11} allow {}, downgrade {}, deny {}",
            "verdicts", v.allow, v.downgrade, v.deny
        )?;
        if v.unknown > 0 {
            write!(s, ", unknown {}", v.unknown)?;
        }
        writeln!(s)?;
        writeln!(s, "{:<11} {:.6} USD", "cost", self.total_cost_usd)?;
        let u = &self.unanswered;
        writeln!(
            s,
            "{:<11} {} decisions without telemetry, estimate {:.6} USD{}",
            "unanswered",
            u.count,
            u.estimate_usd,
            if u.allowed && u.count > 0 {
                " (allowed)"
            } else {
                ""
            }
        )?;
        writeln!(s, "{:<11} {}", "problems", self.problem_count)?;
        for p in &self.problems {
            writeln!(s, "  {p}")?;
        }
        if self.more_problems > 0 {
            writeln!(s, "  ... {} more", self.more_problems)?;
        }
        if self.consistent {
            writeln!(s, "consistent")
        } else {
            writeln!(s, "INCONSISTENT: {} problems", self.problem_count)
        }
    }
}
