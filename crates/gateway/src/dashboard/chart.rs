//! A sensor's history as an SVG chart, drawn on the server: the mean of
//! each bucket as a line, its minimum and maximum as a band behind it,
//! nice round ticks on both axes, times in the hub's time zone. Pure: the
//! buckets and the period in, markup out.

use maud::{html, Markup};

/// One bucket of `history.get`'s period answer.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
pub struct Bucket {
    /// Unix seconds the bucket starts at.
    pub start: f64,
    pub min: f64,
    pub avg: f64,
    pub max: f64,
}

/// A drawing's own size: the SVG scales to its box, text with it, so a
/// phone gets a narrower drawing (its text stays readable) than a desktop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Size {
    pub width: f64,
    pub height: f64,
    /// About how many value ticks.
    pub value_ticks: usize,
    /// At most how many time ticks.
    pub time_ticks: f64,
}

/// For a desktop's width.
pub const WIDE: Size = Size {
    width: 960.0,
    height: 280.0,
    value_ticks: 5,
    time_ticks: 7.0,
};

/// For a phone's.
pub const NARROW: Size = Size {
    width: 360.0,
    height: 220.0,
    value_ticks: 4,
    time_ticks: 3.0,
};

const LEFT: f64 = 52.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 26.0;

/// The chart of `buckets` (each `bucket` seconds wide) over `from..to`,
/// values in `unit` (said in its label; the page titles it).
pub fn render(
    buckets: &[Bucket],
    from: f64,
    to: f64,
    bucket: f64,
    unit: &str,
    zone: &jiff::tz::TimeZone,
    size: Size,
) -> Markup {
    let (width, height) = (size.width, size.height);
    let label = format!(
        "History in {} from {} to {}",
        if unit.is_empty() { "units" } else { unit },
        clock(from, zone, true),
        clock(to, zone, true)
    );
    let buckets: Vec<Bucket> = buckets
        .iter()
        .copied()
        .filter(|b| b.min.is_finite() && b.max.is_finite() && b.avg.is_finite() && b.start.is_finite())
        .collect();
    let plot_width = width - LEFT - RIGHT;
    let plot_height = height - TOP - BOTTOM;
    let to = if to > from { to } else { from + 1.0 };
    let x = |time: f64| LEFT + (time - from) / (to - from) * plot_width;
    let (low, high) = value_range(&buckets);
    let y_ticks = nice_ticks(low, high, size.value_ticks);
    let (low, high) = (
        y_ticks.first().copied().unwrap_or(low).min(low),
        y_ticks.last().copied().unwrap_or(high).max(high),
    );
    let y = |value: f64| TOP + (high - value) / (high - low) * plot_height;
    let x_ticks = time_ticks(from, to, zone, size.time_ticks);
    let day_labels = to - from > 2.0 * 86_400.0;
    let segments = segments(&buckets, bucket);
    html! {
        svg.chart viewBox=(format!("0 0 {width} {height}")) role="img" aria-label=(label) {
            title { (label) }
            @for tick in &y_ticks {
                line.grid-line x1=(LEFT) x2=(width - RIGHT) y1=(fixed(y(*tick))) y2=(fixed(y(*tick))) {}
                text.axis x=(LEFT - 6.0) y=(fixed(y(*tick) + 4.0)) text-anchor="end" { (tick_text(*tick, &y_ticks)) }
            }
            @for tick in &x_ticks {
                line.grid-line x1=(fixed(x(*tick))) x2=(fixed(x(*tick))) y1=(TOP) y2=(height - BOTTOM) {}
                text.axis x=(fixed(x(*tick))) y=(height - 8.0) text-anchor="middle" { (clock(*tick, zone, day_labels)) }
            }
            @if buckets.is_empty() {
                text.nothing x=(LEFT + plot_width / 2.0) y=(TOP + plot_height / 2.0) text-anchor="middle" {
                    "No values in this period"
                }
            }
            @for segment in &segments {
                path.band d=(band_path(segment, bucket, &x, &y)) {}
                path.line d=(line_path(segment, bucket, &x, &y)) {}
            }
        }
    }
}

/// The lowest minimum and highest maximum, padded so a flat line sits in
/// the middle.
fn value_range(buckets: &[Bucket]) -> (f64, f64) {
    let low = buckets.iter().map(|b| b.min).fold(f64::INFINITY, f64::min);
    let high = buckets.iter().map(|b| b.max).fold(f64::NEG_INFINITY, f64::max);
    if !low.is_finite() || !high.is_finite() {
        return (0.0, 1.0);
    }
    if high - low < 1e-9 {
        let pad = (low.abs() * 0.05).max(1.0);
        return (low - pad, high + pad);
    }
    (low, high)
}

/// About `count` ticks at round steps (1, 2 or 5 times a power of ten)
/// covering `low..high`.
fn nice_ticks(low: f64, high: f64, count: usize) -> Vec<f64> {
    let raw = (high - low) / count.max(1) as f64;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power);
    let first = (low / step).floor() * step;
    let mut ticks = Vec::new();
    let mut tick = first;
    // Up to the first tick at or above the highest value.
    loop {
        ticks.push(tick);
        if tick >= high - step * 1e-9 || ticks.len() >= 50 {
            break;
        }
        tick += step;
    }
    ticks
}

/// A tick's text with as many decimals as the step needs.
fn tick_text(value: f64, ticks: &[f64]) -> String {
    let step = match ticks {
        [a, b, ..] => (b - a).abs(),
        _ => 1.0,
    };
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil() as usize
    };
    let text = format!("{value:.decimals$}");
    // "-0" is 0.
    if text.trim_start_matches('-').chars().all(|c| c == '0' || c == '.') {
        text.trim_start_matches('-').to_owned()
    } else {
        text
    }
}

/// Times for the x axis: at most about `most`, at round local times.
fn time_ticks(from: f64, to: f64, zone: &jiff::tz::TimeZone, most: f64) -> Vec<f64> {
    const STEPS: &[f64] = &[
        60.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 10800.0, 21600.0, 43200.0, 86400.0, 172800.0, 604800.0,
    ];
    let span = to - from;
    let step = STEPS.iter().copied().find(|s| span / s <= most).unwrap_or(604800.0);
    // Round in local time: the zone's offset at the start.
    let offset = jiff::Timestamp::from_second(from as i64)
        .map(|t| zone.to_offset(t).seconds() as f64)
        .unwrap_or(0.0);
    let mut tick = ((from + offset) / step).ceil() * step - offset;
    let mut ticks = Vec::new();
    while tick <= to && ticks.len() < 12 {
        ticks.push(tick);
        tick += step;
    }
    ticks
}

/// A time as the hub's clock shows it: `14:05`, or `2 Dec` (with the
/// time when `with_time`) for longer spans.
fn clock(time: f64, zone: &jiff::tz::TimeZone, long: bool) -> String {
    let Ok(stamp) = jiff::Timestamp::from_second(time as i64) else {
        return String::new();
    };
    let zoned = stamp.to_zoned(zone.clone());
    if long {
        zoned.strftime("%-d %b %H:%M").to_string()
    } else {
        zoned.strftime("%H:%M").to_string()
    }
}

/// Runs of buckets with no gap wider than two buckets: a sensor that went
/// silent shows as a break, not as a straight line across.
fn segments(buckets: &[Bucket], bucket: f64) -> Vec<Vec<Bucket>> {
    let mut runs: Vec<Vec<Bucket>> = Vec::new();
    for b in buckets {
        match runs.last_mut() {
            Some(run) if run.last().is_some_and(|last| b.start - last.start <= 2.0 * bucket) => run.push(*b),
            _ => runs.push(vec![*b]),
        }
    }
    runs
}

/// Two decimals are plenty in a 720-wide drawing.
fn fixed(value: f64) -> String {
    format!("{value:.1}")
}

/// The line through each bucket's mean, at its middle.
fn line_path(run: &[Bucket], bucket: f64, x: &dyn Fn(f64) -> f64, y: &dyn Fn(f64) -> f64) -> String {
    let mut d = String::new();
    for (i, b) in run.iter().enumerate() {
        let middle = b.start + bucket / 2.0;
        d.push_str(&format!(
            "{}{} {} ",
            if i == 0 { "M" } else { "L" },
            fixed(x(middle)),
            fixed(y(b.avg))
        ));
    }
    // A lone bucket is a short dash, not an invisible point.
    if run.len() == 1 {
        let b = run[0];
        d = format!(
            "M{} {} L{} {}",
            fixed(x(b.start)),
            fixed(y(b.avg)),
            fixed(x(b.start + bucket)),
            fixed(y(b.avg))
        );
    }
    d.trim_end().to_owned()
}

/// The band from each bucket's minimum to its maximum.
fn band_path(run: &[Bucket], bucket: f64, x: &dyn Fn(f64) -> f64, y: &dyn Fn(f64) -> f64) -> String {
    let middle = |b: &Bucket| {
        if run.len() == 1 {
            b.start
        } else {
            b.start + bucket / 2.0
        }
    };
    let mut d = String::new();
    for (i, b) in run.iter().enumerate() {
        d.push_str(&format!(
            "{}{} {} ",
            if i == 0 { "M" } else { "L" },
            fixed(x(middle(b))),
            fixed(y(b.max))
        ));
    }
    if run.len() == 1 {
        d.push_str(&format!(
            "L{} {} ",
            fixed(x(run[0].start + bucket)),
            fixed(y(run[0].max))
        ));
        d.push_str(&format!(
            "L{} {} ",
            fixed(x(run[0].start + bucket)),
            fixed(y(run[0].min))
        ));
    }
    for b in run.iter().rev() {
        d.push_str(&format!("L{} {} ", fixed(x(middle(b))), fixed(y(b.min))));
    }
    d.push('Z');
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc() -> jiff::tz::TimeZone {
        jiff::tz::TimeZone::UTC
    }

    fn bucket(start: f64, min: f64, avg: f64, max: f64) -> Bucket {
        Bucket { start, min, avg, max }
    }

    #[test]
    fn ticks_are_round_and_cover_the_values() {
        assert_eq!(
            nice_ticks(15.0, 25.0, 5),
            vec![14.0, 16.0, 18.0, 20.0, 22.0, 24.0, 26.0]
        );
        assert_eq!(nice_ticks(15.0, 18.34, 4), vec![15.0, 16.0, 17.0, 18.0, 19.0]);
        let small = nice_ticks(0.12, 0.19, 5);
        assert!(
            small.first().unwrap() <= &0.12 && small.last().unwrap() >= &0.19,
            "{small:?}"
        );
        assert_eq!(tick_text(0.15000000000000002, &small), "0.15");
        assert_eq!(tick_text(-0.0, &[0.0, 1.0]), "0");
    }

    #[test]
    fn times_fall_on_round_local_minutes_and_days() {
        let from = 1_796_236_081.0; // 2026-12-02 18:28:01 UTC
        let ticks = time_ticks(from, from + 3600.0, &utc(), 6.0);
        assert_eq!(ticks.len(), 6);
        assert!(ticks.iter().all(|t| t % 600.0 == 0.0), "{ticks:?}");
        let paris = jiff::tz::TimeZone::get("Europe/Paris").unwrap();
        let days = time_ticks(from, from + 6.0 * 86400.0, &paris, 6.0);
        // Paris is an hour ahead in December: local midnight is 23:00 UTC.
        assert!(days.iter().all(|t| (t + 3600.0) % 86400.0 == 0.0), "{days:?}");
        assert_eq!(clock(days[0], &paris, true), "3 Dec 00:00");
    }

    #[test]
    fn a_chart_has_its_line_its_band_a_break_at_a_gap_and_escaped_text() {
        let buckets = [
            bucket(0.0, 1.0, 2.0, 3.0),
            bucket(60.0, 2.0, 3.0, 4.0),
            // A gap of ten buckets: a second run.
            bucket(660.0, 1.0, 1.5, 2.0),
            bucket(720.0, f64::NAN, 1.0, 2.0),
        ];
        let svg = render(&buckets, 0.0, 900.0, 60.0, "<degC>", &utc(), WIDE).into_string();
        assert_eq!(svg.matches("class=\"line\"").count(), 2, "{svg}");
        assert_eq!(svg.matches("class=\"band\"").count(), 2);
        assert!(svg.contains("&lt;degC&gt;"), "{svg}");
        assert!(!svg.contains("NaN"));
        let empty = render(&[], 0.0, 900.0, 60.0, "", &utc(), NARROW).into_string();
        assert!(empty.contains("No values in this period"));
    }
}
