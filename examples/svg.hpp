// examples/svg.hpp: just enough SVG for the demo's two pictures (training curves, activation patterns), written as
// plain text: no plotting library.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace sma_demo::svg {

inline std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", v);
  return buf;
}

inline std::string escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '<') o += "&lt;";
    else if (c == '>') o += "&gt;";
    else if (c == '&') o += "&amp;";
    else if (c == '"') o += "&quot;";
    else o += c;
  }
  return o;
}

inline std::string text(double x, double y, const std::string& s, int size = 12, const char* anchor = "start",
                        const char* extra = "") {
  return "<text x=\"" + num(x) + "\" y=\"" + num(y) + "\" font-size=\"" + std::to_string(size) +
         "\" text-anchor=\"" + anchor + "\" " + extra + ">" + escape(s) + "</text>\n";
}

inline std::string rect(double x, double y, double w, double h, const std::string& fill, const char* extra = "") {
  return "<rect x=\"" + num(x) + "\" y=\"" + num(y) + "\" width=\"" + num(w) + "\" height=\"" + num(h) +
         "\" fill=\"" + fill + "\" " + extra + "/>\n";
}

/// A grey level in [0, 1] as #rrggbb.
inline std::string grey(double v) {
  const int g = static_cast<int>(std::lround(255 * std::clamp(v, 0.0, 1.0)));
  char buf[8];
  std::snprintf(buf, sizeof buf, "#%02x%02x%02x", g, g, g);
  return buf;
}

struct Series {
  std::string label, color;
  std::vector<double> x, y;
  double width = 1.5;
  double opacity = 1.0;
  bool markers = false;  ///< dots at the points (for sparse series such as evaluations)
};

/// "Nice" tick values covering [lo, hi].
inline std::vector<double> ticks(double lo, double hi, int target = 5) {
  const double span = hi - lo;
  if (!(span > 0)) return {lo};
  const double raw = span / target, mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double step = raw / mag < 1.5 ? mag : raw / mag < 3 ? 2 * mag : raw / mag < 7 ? 5 * mag : 10 * mag;
  std::vector<double> t;
  for (double v = std::ceil(lo / step) * step; v <= hi + 1e-9 * span; v += step) t.push_back(std::abs(v) < 1e-12 ? 0 : v);
  return t;
}

inline std::string tick_label(double v) {
  char buf[32];
  if (std::abs(v) >= 1000)
    std::snprintf(buf, sizeof buf, "%.0f", v);
  else if (std::abs(v - std::round(v)) < 1e-9)
    std::snprintf(buf, sizeof buf, "%.0f", v);
  else
    std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

/// A line chart in the box (x, y, w, h) with axes, ticks, a title and a legend. ylo/yhi fix the y range when
/// ylo < yhi (else it fits the data).
inline std::string line_chart(double x, double y, double w, double h, const std::string& title,
                              const std::string& xlabel, const std::vector<Series>& series, double ylo = 0,
                              double yhi = 0) {
  double xl = 1e300, xh = -1e300, yl = 1e300, yh = -1e300;
  for (const auto& s : series)
    for (std::size_t i = 0; i < s.x.size() && i < s.y.size(); ++i) {
      if (!std::isfinite(s.y[i])) continue;
      xl = std::min(xl, s.x[i]), xh = std::max(xh, s.x[i]);
      yl = std::min(yl, s.y[i]), yh = std::max(yh, s.y[i]);
    }
  if (xl > xh) xl = 0, xh = 1, yl = 0, yh = 1;
  if (xh == xl) xh = xl + 1;
  if (ylo < yhi) yl = ylo, yh = yhi;
  if (yh == yl) yh = yl + 1;
  const double pl = 52, pr = 12, pt = 26, pb = 38;  // plot area padding
  const double X0 = x + pl, Y0 = y + pt, W = w - pl - pr, H = h - pt - pb;
  auto px = [&](double v) { return X0 + (v - xl) / (xh - xl) * W; };
  auto py = [&](double v) { return Y0 + H - (v - yl) / (yh - yl) * H; };
  std::ostringstream o;
  o << text(x + w / 2, y + 16, title, 14, "middle", "font-weight=\"bold\"");
  o << rect(X0, Y0, W, H, "#ffffff", "stroke=\"#888\" stroke-width=\"1\"");
  for (double t : ticks(yl, yh)) {
    o << "<line x1=\"" << num(X0) << "\" y1=\"" << num(py(t)) << "\" x2=\"" << num(X0 + W) << "\" y2=\"" << num(py(t))
      << "\" stroke=\"#e4e4e4\"/>\n";
    o << text(X0 - 5, py(t) + 4, tick_label(t), 11, "end");
  }
  for (double t : ticks(xl, xh)) {
    o << "<line x1=\"" << num(px(t)) << "\" y1=\"" << num(Y0) << "\" x2=\"" << num(px(t)) << "\" y2=\"" << num(Y0 + H)
      << "\" stroke=\"#f0f0f0\"/>\n";
    o << text(px(t), Y0 + H + 15, tick_label(t), 11, "middle");
  }
  o << text(X0 + W / 2, Y0 + H + 32, xlabel, 12, "middle");
  double ly = Y0 + 14;
  for (const auto& s : series) {
    std::string pts;
    for (std::size_t i = 0; i < s.x.size() && i < s.y.size(); ++i) {
      if (!std::isfinite(s.y[i])) continue;
      pts += num(px(s.x[i])) + "," + num(py(std::clamp(s.y[i], yl, yh))) + " ";
    }
    o << "<polyline fill=\"none\" stroke=\"" << s.color << "\" stroke-width=\"" << num(s.width) << "\" stroke-opacity=\""
      << num(s.opacity) << "\" points=\"" << pts << "\"/>\n";
    if (s.markers)
      for (std::size_t i = 0; i < s.x.size() && i < s.y.size(); ++i)
        o << "<circle cx=\"" << num(px(s.x[i])) << "\" cy=\"" << num(py(std::clamp(s.y[i], yl, yh)))
          << "\" r=\"3\" fill=\"" << s.color << "\"/>\n";
    if (!s.label.empty()) {
      o << "<line x1=\"" << num(X0 + W - 150) << "\" y1=\"" << num(ly - 4) << "\" x2=\"" << num(X0 + W - 130) << "\" y2=\""
        << num(ly - 4) << "\" stroke=\"" << s.color << "\" stroke-width=\"2.5\"/>\n";
      o << text(X0 + W - 125, ly, s.label, 11);
      ly += 15;
    }
  }
  return o.str();
}

/// A complete document of the given size around `body`.
inline std::string document(double w, double h, const std::string& body) {
  return "<svg xmlns=\"http://www.w3.org/2000/svg\" xmlns:xlink=\"http://www.w3.org/1999/xlink\" width=\"" + num(w) + "\" height=\"" + num(h) + "\" viewBox=\"0 0 " +
         num(w) + " " + num(h) + "\" font-family=\"Helvetica, Arial, sans-serif\">\n" +
         rect(0, 0, w, h, "#ffffff") + body + "</svg>\n";
}

inline void write(const std::string& path, const std::string& content) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw std::runtime_error("cannot write " + path);
  f << content;
  if (!f) throw std::runtime_error("write to " + path + " failed");
}

}  // namespace sma_demo::svg
