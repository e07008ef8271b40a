// Generates top-k fixtures with libstdc++'s std::nth_element / std::partial_sort exactly as
// PyTorch's CPU topk calls them. Build: g++ -O2 -std=c++17 topk_gen.cpp
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <utility>
#include <vector>
int main() {
  std::mt19937_64 rng(20261129);
  const float pool[] = {0.0f, 0.0f, 0.0f, 1.5f, -2.0f, 0.25f, 0.25f, 3.0f, -0.5f, 0.0f};
  int sizes[] = {5, 8, 13, 18, 25, 33, 64, 70, 75, 130, 200, 1024, 1100, 3000};
  int ks[] = {1, 2, 4, 16, 17};
  printf("[\n");
  bool first_case = true;
  for (int n : sizes) for (int k : ks) for (int masked = 0; masked < 2; ++masked) {
    if (k >= n) continue;
    std::vector<float> v(n);
    for (int i = 0; i < n; ++i) v[i] = pool[rng() % 10];
    if (masked) for (int i = n - n / 3; i < n; ++i) v[i] = -std::numeric_limits<float>::infinity();
    using E = std::pair<double, long>;
    std::vector<E> q(n);
    for (int i = 0; i < n; ++i) q[i] = {v[i], i};
    auto comp = [](const E& x, const E& y) { return x.first > y.first; };
    if ((long)k * 64 <= n) std::partial_sort(q.begin(), q.begin() + k, q.end(), comp);
    else std::nth_element(q.begin(), q.begin() + k - 1, q.end(), comp);
    std::vector<long> sel;
    for (int i = 0; i < k; ++i) sel.push_back(q[i].second);
    std::sort(sel.begin(), sel.end());
    printf("%s{\"k\": %d, \"values\": [", first_case ? "" : ",\n", k);
    first_case = false;
    for (int i = 0; i < n; ++i) { if (std::isinf(v[i])) printf("%snull", i ? "," : ""); else printf("%s%g", i ? "," : "", v[i]); }
    printf("], \"selected\": [");
    for (size_t i = 0; i < sel.size(); ++i) printf("%s%ld", i ? "," : "", sel[i]);
    printf("]}");
  }
  printf("\n]\n");
}
