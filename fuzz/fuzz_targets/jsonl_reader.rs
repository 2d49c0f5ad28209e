//! The JSONL record reader on arbitrary lines: a record with its UTC time, or a reason the
//! engine reports with the line's offset, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llmscope_wire::records::{parse_decision, parse_telemetry, parse_ts_us};

fuzz_target!(|data: &[u8]| {
    for line in data.split(|b| *b == b'\n') {
        match parse_telemetry(line) {
            Ok((ts, row)) => assert_eq!(parse_ts_us(&row.timestamp), Ok(ts)),
            Err(why) => assert!(!why.is_empty()),
        }
        match parse_decision(line) {
            Ok((ts, row)) => assert_eq!(parse_ts_us(&row.timestamp), Ok(ts)),
            Err(why) => assert!(!why.is_empty()),
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_ts_us(text);
    }
});
