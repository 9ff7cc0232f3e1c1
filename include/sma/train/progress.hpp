// sma/train/progress.hpp: a progress bar for training loops, on stderr by default.
//
// On a terminal it redraws one line in place (at most 10 times a second); otherwise (a log file, CI) it prints a
// plain line every `line_interval` seconds and at the end, so logs stay readable. The time left is extrapolated
// from the steps done since start() at the recent pace.
#pragma once

#include <sma/core/index.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>

#if !defined(_WIN32)
#include <sys/ioctl.h>
#include <unistd.h>
#endif

namespace sma::train {

/// "42s", "3m05s", "1h02m".
inline std::string format_duration(double seconds) {
  if (!(seconds >= 0) || !std::isfinite(seconds)) return "?";
  const long s = std::lround(seconds);
  char buf[32];
  if (s < 60)
    std::snprintf(buf, sizeof buf, "%lds", s);
  else if (s < 3600)
    std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
  else
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", s / 3600, (s % 3600) / 60);
  return buf;
}

/// "950", "12.3k", "1.20M".
inline std::string format_count(double v) {
  char buf[32];
  if (v < 1e3)
    std::snprintf(buf, sizeof buf, "%.0f", v);
  else if (v < 1e6)
    std::snprintf(buf, sizeof buf, "%.1fk", v / 1e3);
  else
    std::snprintf(buf, sizeof buf, "%.2fM", v / 1e6);
  return buf;
}

class ProgressBar {
 public:
  using Clock = std::chrono::steady_clock;

  /// `total` steps; `out` is where the bar goes; `line_interval` seconds between lines when `out` is not a terminal.
  explicit ProgressBar(Index total, std::FILE* out = stderr, double line_interval = 10.0)
      : total_(total), out_(out), interval_(line_interval) {
#if !defined(_WIN32)
    tty_ = ::isatty(::fileno(out)) != 0;
    if (tty_) {
      struct winsize w {};
      if (::ioctl(::fileno(out), TIOCGWINSZ, &w) == 0 && w.ws_col > 20) width_ = w.ws_col;
    }
#endif
  }

  bool is_tty() const { return tty_; }
  void set_tty(bool on) { tty_ = on; }

  /// Starts the clock at step `first` (non-zero when resuming).
  void start(Index first = 0) {
    first_ = first;
    t0_ = last_draw_ = last_line_ = Clock::now();
    started_ = true;
  }

  /// Seconds since start().
  double elapsed() const { return std::chrono::duration<double>(Clock::now() - t0_).count(); }

  /// Estimated seconds left after `done` of `total` steps.
  double seconds_left(Index done) const {
    const Index since = done - first_;
    if (since <= 0) return -1;
    return elapsed() / double(since) * double(total_ - done);
  }

  /// Reports that `done` steps are complete; `fields` is the text after the counter ("loss 0.51 acc 80%").
  void update(Index done, const std::string& fields) {
    if (!started_) start(0);
    const auto now = Clock::now();
    const bool last = done >= total_;
    if (tty_) {
      if (!last && std::chrono::duration<double>(now - last_draw_).count() < 0.1) return;
      last_draw_ = now;
      std::string line = bar(done) + " " + fields + " | " + format_duration(seconds_left(done)) + " left";
      if (static_cast<int>(line.size()) > width_ - 1) line.resize(static_cast<std::size_t>(width_ - 1));
      std::fprintf(out_, "\r%s\033[K", line.c_str());
      std::fflush(out_);
      drawn_ = true;
    } else {
      if (!last && std::chrono::duration<double>(now - last_line_).count() < interval_) return;
      last_line_ = now;
      std::fprintf(out_, "step %lld/%lld %s | %s elapsed, %s left\n", static_cast<long long>(done),
                   static_cast<long long>(total_), fields.c_str(), format_duration(elapsed()).c_str(),
                   format_duration(seconds_left(done)).c_str());
      std::fflush(out_);
    }
  }

  /// Ends the bar's line (terminal) so that later output starts on a fresh line.
  void finish() {
    if (tty_ && drawn_) std::fprintf(out_, "\n");
    std::fflush(out_);
    drawn_ = false;
  }

  /// Prints a message without tearing the bar: clears the line first on a terminal.
  void message(const std::string& text) {
    if (tty_ && drawn_) std::fprintf(out_, "\r\033[K");
    std::fprintf(out_, "%s\n", text.c_str());
    std::fflush(out_);
    drawn_ = false;
  }

 private:
  std::string bar(Index done) const {
    const int n = 20;
    const double f = total_ > 0 ? std::min(1.0, double(done) / double(total_)) : 1.0;
    const int full = static_cast<int>(f * n);
    std::string s = "[";
    for (int i = 0; i < n; ++i) s += i < full ? '#' : (i == full ? '>' : '.');
    char buf[48];
    std::snprintf(buf, sizeof buf, "] %lld/%lld", static_cast<long long>(done), static_cast<long long>(total_));
    return s + buf;
  }

  Index total_ = 0, first_ = 0;
  std::FILE* out_;
  double interval_;
  bool tty_ = false, started_ = false, drawn_ = false;
  int width_ = 120;
  Clock::time_point t0_, last_draw_, last_line_;
};

}  // namespace sma::train
