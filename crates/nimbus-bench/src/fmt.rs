//! Numbers as the reports print them.

/// `1 client`, `32 clients`.
pub fn clients_text(n: usize) -> String {
    if n == 1 {
        "1 client".to_owned()
    } else {
        format!("{n} clients")
    }
}

/// `212 µs`, `1.25 ms`, `2.10 s`.
pub fn fmt_us(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.2} s", us / 1_000_000.0)
    }
}

/// `48.3 µs`, `1.25 ms`: [`fmt_us`] with tenths below 1 ms, for latencies of tens of µs.
pub fn fmt_us_tenths(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.1} µs")
    } else {
        fmt_us(us)
    }
}

/// `+4.2 µs`, `-0.8 µs`, `+3.17 ms`: a difference of latencies.
pub fn fmt_delta_us(us: f64) -> String {
    if us.abs() < 1000.0 {
        format!("{us:+.1} µs")
    } else {
        format!("{:+.2} ms", us / 1000.0)
    }
}

/// `6,412`.
pub fn fmt_count(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_formatted_for_people() {
        assert_eq!(fmt_us(212.4), "212 µs");
        assert_eq!(fmt_us(1250.0), "1.25 ms");
        assert_eq!(fmt_us(2_100_000.0), "2.10 s");
        assert_eq!(fmt_us_tenths(48.34), "48.3 µs");
        assert_eq!(fmt_us_tenths(1250.0), "1.25 ms");
        assert_eq!(fmt_delta_us(4.24), "+4.2 µs");
        assert_eq!(fmt_delta_us(-0.8), "-0.8 µs");
        assert_eq!(fmt_delta_us(3172.0), "+3.17 ms");
        assert_eq!(fmt_delta_us(-1500.0), "-1.50 ms");
        assert_eq!(fmt_count(6412.3), "6,412");
        assert_eq!(fmt_count(999.0), "999");
        assert_eq!(fmt_count(1_234_567.0), "1,234,567");
    }
}
