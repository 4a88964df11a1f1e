// game-server: a small stand-in for the C++ game server of the seed
// documents (shared/seeds/README.md beside the repository): a fixed-rate tick
// loop over named systems, with its documented kinds of trouble built in.
//
//   game-server [--port 7777] [--tick-hz 60] [--players 500] [--churn 5]
//               [--incident frame-spike|leak|hot-path|abort] [--incident-after SECONDS]
//               [--duration SECONDS] [--report-every SECONDS]
//
// Every tick runs, in order:
//   network_poll        UDP input from real clients, plus the bots' input packets
//   ai_update           bots pick targets and follow paths (hot_path_pathfinding)
//   physics_step        movement, wall and player collisions, projectiles
//   serialize_snapshot  per-player view of the world, encoded, sent to real clients,
//                       kept in the player's replay history (lag compensation)
//   update_sessions     players leave and join (--churn bots per second)
// and its wall-clock duration is the frame time (reports give the tick
// thread's CPU time per frame too: slow code and a starved thread differ).
//
// UDP (--port): "JOIN" -> "WELCOME <id>"; "INPUT <id> <dx> <dy>" steers a
// player (and makes it a real client, sent its snapshots); "LEAVE <id>";
// "PING" -> "PONG <tick> <players>".
//
// Incidents (--incident, from start or after --incident-after seconds):
//   frame-spike  every 3 s, for 0.5 s, physics_step subdivides its step
//                (40 substeps and more instead of 4) until it takes 10x its
//                usual time and at least 1.25 tick periods: frames overrun
//                the frame budget (16.7 ms at 60 Hz).
//   leak         a leaving player's replay history (64 KiB) is never
//                released: RSS grows with every departure.
//   hot-path     the bots' path cache is gone: each bot replans every 8 ticks
//                and each search floods the whole map; hot_path_pathfinding
//                takes ~90 % of the CPU and the tick rate falls well below
//                the target.
//   abort        resolve_contacts (in physics_step) asserts that every
//                player's hp stays in 1..100; the incident's first hit takes a
//                player below 1 without a respawn: the assertion fails and the
//                server aborts (SIGABRT).
//
// Stdout: a banner when ready ("game-server pid PID port PORT tick-hz HZ
// players N"), a "report ..." line every --report-every seconds, and a
// "summary ticks=... ticks_per_sec=... frame_p50_us=... frame_p99_us=..."
// line at exit (--duration elapsed, SIGINT or SIGTERM; exit status 0).

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

// The systems and hot functions have C linkage so that profiles show their
// plain names (no mangling, no parameter lists), and are never inlined.
#define NAMED extern "C" __attribute__((noinline))
// The rest is plain C++, as a real server is: mangled names (demangled by
// the profiler), and helpers the compiler inlines (put_varint always is: a
// profiler must still show it, from the debug info).
#define OUT_OF_LINE __attribute__((noinline))
#define ALWAYS_INLINE static inline __attribute__((always_inline))

constexpr int kGrid = 160;            // the map is kGrid x kGrid cells
constexpr int kCells = kGrid * kGrid;
constexpr int kBucket = 8;            // spatial hash: buckets of kBucket x kBucket cells
constexpr int kBuckets = kGrid / kBucket;
constexpr int kHistory = 256;         // snapshots kept per player
constexpr int kLocalPathBudget = 600; // nodes a normal replan may expand
constexpr float kViewRadius = 16.0f;
constexpr int kSubsteps = 4;          // physics runs at 4x the tick rate
constexpr float kPlayerRadius = 0.45f;
constexpr int kProjectilesPerPlayer = 4;

enum class Incident { None, FrameSpike, Leak, HotPath, Abort };

struct Options {
    int port = 7777;
    double tick_hz = 60;
    int players = 500;
    double churn = 5; // players leaving (and as many joining) per second
    Incident incident = Incident::None;
    double incident_after = 0;
    double duration = 0;
    double report_every = 0;
} opt;

volatile sig_atomic_t running = 1;

double now_s() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

double start_time, incident_start;

// CPU time of the tick thread: a frame's CPU time against its wall time
// tells slow code from a starved thread.
double thread_cpu_s() {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

bool incident_on(Incident which) {
    return opt.incident == which && now_s() >= incident_start;
}

struct Rng {
    uint64_t s;
    uint64_t next() {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        return s * 2685821657736338717ULL;
    }
    float unit() { return (next() >> 40) / 16777216.0f; } // [0, 1)
};

struct Vec2 {
    float x = 0, y = 0;
};

// One player's view at one tick, as kept for lag compensation: 256 bytes.
struct Snapshot {
    uint32_t tick, player;
    float x, y, vx, vy;
    uint16_t hp, visible_count;
    uint32_t checksum;
    uint16_t visible[112];
};
static_assert(sizeof(Snapshot) == 256, "a snapshot is 256 bytes");

struct Projectile {
    Vec2 pos, vel;
    float ttl = 0;
};

struct Player {
    uint32_t id = 0;
    Vec2 pos, vel, input;
    int hp = 100;
    uint32_t target = 0; // id of the player chased (bots)
    std::vector<int> path; // cells, next waypoint last
    int path_goal = -1;
    bool bot = true;
    sockaddr_in addr{};
    Rng rng{1};
    Projectile shots[kProjectilesPerPlayer];
    std::vector<Snapshot> *history = nullptr; // owned by World::replay
};

struct World {
    std::vector<uint8_t> walls = std::vector<uint8_t>(kCells);
    std::vector<std::unique_ptr<Player>> players;
    std::unordered_map<uint32_t, Player *> by_id;
    std::unordered_map<uint32_t, std::vector<Snapshot>> replay; // per-player history
    std::vector<std::vector<uint32_t>> buckets = std::vector<std::vector<uint32_t>>(kBuckets * kBuckets);
    uint32_t next_id = 1;
    uint64_t tick = 0;
    Rng rng{0x9e3779b97f4a7c15ULL};
    int sock = -1;
    std::vector<uint8_t> wire; // one encoded snapshot
    uint64_t checksum = 0;     // of everything produced, so no work is dead
    uint64_t departed = 0;
} world;

int cell_of(Vec2 p) {
    int cx = std::clamp(static_cast<int>(p.x), 0, kGrid - 1);
    int cy = std::clamp(static_cast<int>(p.y), 0, kGrid - 1);
    return cy * kGrid + cx;
}

bool wall_at(Vec2 p) {
    return world.walls[cell_of(p)] != 0;
}

Player *find_player(uint32_t id) {
    auto it = world.by_id.find(id);
    return it == world.by_id.end() ? nullptr : it->second;
}

// ---------------------------------------------------------------- sessions

Vec2 free_spot(Rng &rng) {
    for (;;) {
        Vec2 p{1 + rng.unit() * (kGrid - 2), 1 + rng.unit() * (kGrid - 2)};
        if (!wall_at(p))
            return p;
    }
}

Player &spawn_player(bool bot) {
    auto p = std::make_unique<Player>();
    p->id = world.next_id++;
    p->bot = bot;
    p->rng.s = 0x2545F4914F6CDD1DULL ^ (p->id * 0x9E3779B97F4A7C15ULL);
    p->pos = free_spot(world.rng);
    // The history is allocated whole (and so touched) when a player joins:
    // memory is flat while the player count is, whatever the tick.
    auto &history = world.replay[p->id];
    history.assign(kHistory, Snapshot{});
    p->history = &history;
    world.by_id[p->id] = p.get();
    world.players.push_back(std::move(p));
    return *world.players.back();
}

void remove_player(size_t index) {
    uint32_t id = world.players[index]->id;
    // The leak: the replay history outlives its player. The fix is this
    // erase; with the incident the entry stays in the map forever.
    if (!incident_on(Incident::Leak))
        world.replay.erase(id);
    world.by_id.erase(id);
    world.players[index] = std::move(world.players.back());
    world.players.pop_back();
    world.departed++;
}

NAMED void update_sessions(double dt) {
    static double due = 0;
    due += opt.churn * dt;
    while (due >= 1 && !world.players.empty()) {
        due -= 1;
        // A random bot leaves and a new one joins.
        size_t i = world.rng.next() % world.players.size();
        if (!world.players[i]->bot)
            continue;
        remove_player(i);
        spawn_player(true);
    }
}

// ---------------------------------------------------------------- network

// Decodes one bot input packet (what a client would have sent): a sequence
// number, a varint-encoded stick position and a checksum.
NAMED bool decode_input_packet(const uint8_t *pkt, size_t len, Vec2 &input) {
    if (len < 8)
        return false;
    uint32_t sum = 2166136261u;
    for (size_t i = 0; i + 4 < len; i++)
        sum = (sum ^ pkt[i]) * 16777619u;
    uint32_t want;
    memcpy(&want, pkt + len - 4, 4);
    if (sum != want)
        return false;
    size_t pos = 2; // after the sequence number
    int32_t axis[2];
    for (int a = 0; a < 2; a++) {
        uint32_t v = 0;
        int shift = 0;
        while (pos < len - 4) {
            uint8_t b = pkt[pos++];
            v |= static_cast<uint32_t>(b & 0x7f) << shift;
            shift += 7;
            if (!(b & 0x80))
                break;
        }
        axis[a] = static_cast<int32_t>((v >> 1) ^ -(v & 1)); // zigzag
    }
    input.x = axis[0] / 1000.0f;
    input.y = axis[1] / 1000.0f;
    return true;
}

// Builds the packet a bot's client would send this tick.
size_t encode_bot_packet(Player &p, uint8_t *pkt) {
    size_t n = 0;
    pkt[n++] = static_cast<uint8_t>(world.tick);
    pkt[n++] = static_cast<uint8_t>(world.tick >> 8);
    int32_t axis[2] = {static_cast<int32_t>((p.rng.unit() - 0.5f) * 2000),
                       static_cast<int32_t>((p.rng.unit() - 0.5f) * 2000)};
    for (int32_t a : axis) {
        uint32_t v = (static_cast<uint32_t>(a) << 1) ^ static_cast<uint32_t>(a >> 31);
        do {
            uint8_t b = v & 0x7f;
            v >>= 7;
            pkt[n++] = b | (v ? 0x80 : 0);
        } while (v);
    }
    uint32_t sum = 2166136261u;
    for (size_t i = 0; i < n; i++)
        sum = (sum ^ pkt[i]) * 16777619u;
    memcpy(pkt + n, &sum, 4);
    return n + 4;
}

void reply(const sockaddr_in &to, const char *text) {
    if (sendto(world.sock, text, strlen(text), MSG_DONTWAIT, reinterpret_cast<const sockaddr *>(&to),
               sizeof to) < 0 &&
        errno != EAGAIN)
        perror("game-server: sendto");
}

NAMED void network_poll() {
    char buf[512];
    for (int i = 0; i < 256; i++) {
        sockaddr_in from{};
        socklen_t fromlen = sizeof from;
        ssize_t n = recvfrom(world.sock, buf, sizeof buf - 1, MSG_DONTWAIT, reinterpret_cast<sockaddr *>(&from),
                             &fromlen);
        if (n < 0)
            break;
        buf[n] = '\0';
        unsigned id;
        float dx, dy;
        char out[64];
        if (!strncmp(buf, "PING", 4)) {
            snprintf(out, sizeof out, "PONG %llu %zu\n", static_cast<unsigned long long>(world.tick),
                     world.players.size());
            reply(from, out);
        } else if (!strncmp(buf, "JOIN", 4)) {
            Player &p = spawn_player(false);
            p.addr = from;
            snprintf(out, sizeof out, "WELCOME %u\n", p.id);
            reply(from, out);
        } else if (sscanf(buf, "INPUT %u %f %f", &id, &dx, &dy) == 3) {
            if (Player *p = find_player(id)) {
                p->bot = false;
                p->addr = from;
                p->input = {std::clamp(dx, -1.0f, 1.0f), std::clamp(dy, -1.0f, 1.0f)};
            }
        } else if (sscanf(buf, "LEAVE %u", &id) == 1) {
            for (size_t k = 0; k < world.players.size(); k++)
                if (world.players[k]->id == id) {
                    remove_player(k);
                    break;
                }
        }
    }
    // The bots' clients "send" their input too.
    uint8_t pkt[32];
    for (auto &p : world.players) {
        if (!p->bot)
            continue;
        size_t len = encode_bot_packet(*p, pkt);
        Vec2 in;
        if (decode_input_packet(pkt, len, in)) {
            p->input.x = 0.8f * p->input.x + 0.2f * in.x;
            p->input.y = 0.8f * p->input.y + 0.2f * in.y;
        }
    }
}

// ---------------------------------------------------------------- AI

uint64_t path_nodes; // nodes expanded, for the report

// A call in the search loop: keeps the function non-leaf so the frame-pointer
// build sets up its frame (gcc drops leaf frames even with
// -fno-omit-frame-pointer), and counts the work.
NAMED void pathfinding_checkpoint(uint64_t nodes) {
    path_nodes += nodes;
    __asm__ volatile("" ::: "memory");
}

// Breadth-first search on the map from `from` towards `goal`, expanding at
// most `budget` nodes, stopping at the goal when `early_exit`; `path` gets the
// cells to walk, next one last (towards the closest cell reached when the
// goal is out of budget).
NAMED void hot_path_pathfinding(int from, int goal, int budget, bool early_exit, std::vector<int> &path) {
    static int parent[kCells];
    static uint32_t seen[kCells];
    static int queue[kCells];
    static uint32_t stamp;
    if (++stamp == 0) { // wrapped: forget every old mark
        memset(seen, 0, sizeof seen);
        stamp = 1;
    }
    int head = 0, tail = 0, best = from;
    int gx = goal % kGrid, gy = goal / kGrid;
    int best_dist = std::abs(from % kGrid - gx) + std::abs(from / kGrid - gy);
    queue[tail++] = from;
    seen[from] = stamp;
    parent[from] = -1;
    uint64_t since_checkpoint = 0;
    while (head < tail && head < budget) {
        int c = queue[head++];
        if (c == goal) {
            best = c;
            best_dist = 0;
            if (early_exit)
                break;
        }
        int cx = c % kGrid, cy = c / kGrid;
        int dist = std::abs(cx - gx) + std::abs(cy - gy);
        if (dist < best_dist) {
            best_dist = dist;
            best = c;
        }
        const int nx[4] = {cx + 1, cx - 1, cx, cx};
        const int ny[4] = {cy, cy, cy + 1, cy - 1};
        for (int k = 0; k < 4; k++) {
            if (nx[k] < 0 || ny[k] < 0 || nx[k] >= kGrid || ny[k] >= kGrid)
                continue;
            int n = ny[k] * kGrid + nx[k];
            if (seen[n] == stamp || world.walls[n])
                continue;
            seen[n] = stamp;
            parent[n] = c;
            queue[tail++] = n;
        }
        if (++since_checkpoint == 1024) {
            pathfinding_checkpoint(since_checkpoint);
            since_checkpoint = 0;
        }
    }
    pathfinding_checkpoint(since_checkpoint);
    path.clear();
    for (int c = best; c != from && c >= 0; c = parent[c])
        path.push_back(c);
}

// The closest other player, through the spatial buckets around `p`.
NAMED uint32_t find_nearest_target(const Player &p) {
    int bx = std::clamp(static_cast<int>(p.pos.x) / kBucket, 0, kBuckets - 1);
    int by = std::clamp(static_cast<int>(p.pos.y) / kBucket, 0, kBuckets - 1);
    uint32_t best = 0;
    float best_d2 = 1e30f;
    for (int r = 1; r <= kBuckets && !best; r++) { // widen until someone is found
        for (int y = std::max(0, by - r); y <= std::min(kBuckets - 1, by + r); y++)
            for (int x = std::max(0, bx - r); x <= std::min(kBuckets - 1, bx + r); x++)
                for (uint32_t slot : world.buckets[y * kBuckets + x]) {
                    const Player &o = *world.players[slot];
                    if (o.id == p.id)
                        continue;
                    float dx = o.pos.x - p.pos.x, dy = o.pos.y - p.pos.y, d2 = dx * dx + dy * dy;
                    if (d2 < best_d2) {
                        best_d2 = d2;
                        best = o.id;
                    }
                }
    }
    return best;
}

double pathfinding_seconds; // time in hot_path_pathfinding, for the report

NAMED void ai_update() {
    bool no_cache = incident_on(Incident::HotPath);
    for (size_t i = 0; i < world.players.size(); i++) {
        Player &p = *world.players[i];
        if (!p.bot)
            continue;
        // Retarget twice a second (and when the target left).
        if ((world.tick + p.id) % 30 == 0 || !find_player(p.target))
            p.target = find_nearest_target(p);
        Player *t = find_player(p.target);
        if (!t)
            continue;
        int here = cell_of(p.pos), goal = cell_of(t->pos);
        // The path cache: replan only when the path ran out or the target
        // moved off its goal cell by more than 3 cells. The hot-path incident
        // is a regression that replaced this by a refresh every 8 ticks and
        // lost the search's early exit: each replan floods the whole map.
        int gdx = std::abs(goal % kGrid - p.path_goal % kGrid), gdy = std::abs(goal / kGrid - p.path_goal / kGrid);
        bool stale = no_cache ? (world.tick + p.id) % 8 == 0 : gdx + gdy > 3;
        if (stale || p.path.empty() || p.path_goal < 0) {
            double t0 = now_s();
            hot_path_pathfinding(here, goal, no_cache ? kCells : kLocalPathBudget, !no_cache, p.path);
            pathfinding_seconds += now_s() - t0;
            p.path_goal = goal;
        }
        while (!p.path.empty() && p.path.back() == here)
            p.path.pop_back();
        Vec2 aim = t->pos;
        if (!p.path.empty()) {
            int c = p.path.back();
            aim = {c % kGrid + 0.5f, c / kGrid + 0.5f};
        }
        float dx = aim.x - p.pos.x, dy = aim.y - p.pos.y, len = std::sqrt(dx * dx + dy * dy) + 1e-3f;
        p.input.x = 0.7f * p.input.x + 0.3f * dx / len;
        p.input.y = 0.7f * p.input.y + 0.3f * dy / len;
        // Shoot at the target when it is close.
        if (len < 6 && p.rng.unit() < 0.1f) {
            for (auto &s : p.shots)
                if (s.ttl <= 0) {
                    s = {p.pos, {dx / len * 20, dy / len * 20}, 0.5f};
                    break;
                }
        }
    }
}

// ---------------------------------------------------------------- physics

OUT_OF_LINE void rebuild_buckets() {
    for (auto &b : world.buckets)
        b.clear();
    for (size_t i = 0; i < world.players.size(); i++) {
        const Player &p = *world.players[i];
        int bx = std::clamp(static_cast<int>(p.pos.x) / kBucket, 0, kBuckets - 1);
        int by = std::clamp(static_cast<int>(p.pos.y) / kBucket, 0, kBuckets - 1);
        world.buckets[by * kBuckets + bx].push_back(static_cast<uint32_t>(i));
    }
}

// Moves `pos` by `d`, sliding along walls: each axis is tested at a few
// points across the body.
NAMED void move_and_collide(Vec2 &pos, Vec2 &vel, Vec2 d) {
    Vec2 next{pos.x + d.x, pos.y};
    bool blocked = false;
    for (float oy = -kPlayerRadius; oy <= kPlayerRadius; oy += kPlayerRadius / 2)
        blocked |= wall_at({next.x + (d.x > 0 ? kPlayerRadius : -kPlayerRadius), next.y + oy});
    if (blocked)
        vel.x = 0;
    else
        pos.x = next.x;
    next = {pos.x, pos.y + d.y};
    blocked = false;
    for (float ox = -kPlayerRadius; ox <= kPlayerRadius; ox += kPlayerRadius / 2)
        blocked |= wall_at({next.x + ox, next.y + (d.y > 0 ? kPlayerRadius : -kPlayerRadius)});
    if (blocked)
        vel.y = 0;
    else
        pos.y = next.y;
    pos.x = std::clamp(pos.x, 1.0f, kGrid - 1.0f);
    pos.y = std::clamp(pos.y, 1.0f, kGrid - 1.0f);
}

// Pushes overlapping players apart and resolves projectile hits, through the
// spatial buckets.
NAMED void resolve_contacts() {
    for (size_t i = 0; i < world.players.size(); i++) {
        Player &p = *world.players[i];
        int bx = std::clamp(static_cast<int>(p.pos.x) / kBucket, 0, kBuckets - 1);
        int by = std::clamp(static_cast<int>(p.pos.y) / kBucket, 0, kBuckets - 1);
        for (int y = std::max(0, by - 1); y <= std::min(kBuckets - 1, by + 1); y++)
            for (int x = std::max(0, bx - 1); x <= std::min(kBuckets - 1, bx + 1); x++)
                for (uint32_t slot : world.buckets[y * kBuckets + x]) {
                    if (slot <= i)
                        continue;
                    Player &o = *world.players[slot];
                    float dx = o.pos.x - p.pos.x, dy = o.pos.y - p.pos.y, d2 = dx * dx + dy * dy;
                    float min = 2 * kPlayerRadius;
                    if (d2 < min * min && d2 > 1e-6f) {
                        float d = std::sqrt(d2), push = (min - d) / 2 / d;
                        p.pos.x -= dx * push;
                        p.pos.y -= dy * push;
                        o.pos.x += dx * push;
                        o.pos.y += dy * push;
                    }
                    // The other player's shots against this player, and back.
                    for (auto *pair : {&p, &o}) {
                        Player &shooter = pair == &p ? o : p;
                        for (auto &s : shooter.shots) {
                            if (s.ttl <= 0)
                                continue;
                            float sx = s.pos.x - pair->pos.x, sy = s.pos.y - pair->pos.y;
                            if (sx * sx + sy * sy < kPlayerRadius * kPlayerRadius) {
                                pair->hp -= 10;
                                s.ttl = 0;
                                // The abort incident: the respawn is skipped.
                                if (incident_on(Incident::Abort))
                                    pair->hp = std::min(pair->hp, 0);
                                else if (pair->hp <= 0) {
                                    pair->hp = 100;
                                    pair->pos = free_spot(world.rng);
                                }
                            }
                        }
                    }
                }
        assert(p.hp > 0 && p.hp <= 100 && "a player's hp stays in 1..100");
    }
}

NAMED void physics_step(double dt) {
    // The frame-spike incident: for half a second every 3 seconds, as when
    // a solver's step clamp misfires under load, physics subdivides its step
    // until it has taken 10x its usual time (10x the substeps alone is only
    // ~5x the time: the repeated substeps run on hot caches), and at least
    // 1.25 tick periods: the frame overruns its budget on any machine.
    static double usual_s = 0; // moving average of spike-free steps
    bool spike = incident_on(Incident::FrameSpike) && std::fmod(now_s() - incident_start, 3.0) < 0.5;
    double start = now_s();
    int substeps = spike ? 10 * kSubsteps : kSubsteps;
    float h = static_cast<float>(dt / substeps);
    for (int s = 0; s < substeps; s++) {
        for (auto &pp : world.players) {
            Player &p = *pp;
            // Accelerate along the input, with drag: top speed ~6 cells/s.
            p.vel.x = (p.vel.x + p.input.x * 30.0f * h) * (1 - 5.0f * h);
            p.vel.y = (p.vel.y + p.input.y * 30.0f * h) * (1 - 5.0f * h);
            move_and_collide(p.pos, p.vel, {p.vel.x * h, p.vel.y * h});
            for (auto &shot : p.shots) {
                if (shot.ttl <= 0)
                    continue;
                shot.ttl -= h;
                shot.pos.x += shot.vel.x * h;
                shot.pos.y += shot.vel.y * h;
                if (wall_at(shot.pos))
                    shot.ttl = 0;
            }
        }
        rebuild_buckets();
        resolve_contacts();
        // Keep subdividing (bounded) until the step took 10x its usual time.
        if (spike && s == substeps - 1 && substeps < 100 * kSubsteps && usual_s > 0 &&
            (now_s() - start < 10 * usual_s || now_s() - start < 1.25 * dt))
            substeps++;
    }
    if (!spike) {
        double took = now_s() - start;
        usual_s = usual_s == 0 ? took : 0.95 * usual_s + 0.05 * took;
    }
}

// ---------------------------------------------------------------- snapshots

ALWAYS_INLINE void put_varint(std::vector<uint8_t> &out, int32_t value) {
    uint32_t v = (static_cast<uint32_t>(value) << 1) ^ static_cast<uint32_t>(value >> 31);
    do {
        uint8_t b = v & 0x7f;
        v >>= 7;
        out.push_back(b | (v ? 0x80 : 0));
    } while (v);
}

// Each player's view: every player within kViewRadius, positions quantized
// and delta-encoded against the viewer; sent to real clients, kept in the
// replay history for everyone.
NAMED void serialize_snapshot() {
    for (auto &pp : world.players) {
        Player &p = *pp;
        Snapshot snap{};
        snap.tick = static_cast<uint32_t>(world.tick);
        snap.player = p.id;
        snap.x = p.pos.x;
        snap.y = p.pos.y;
        snap.vx = p.vel.x;
        snap.vy = p.vel.y;
        snap.hp = static_cast<uint16_t>(p.hp);
        world.wire.clear();
        put_varint(world.wire, static_cast<int32_t>(world.tick));
        put_varint(world.wire, static_cast<int32_t>(p.pos.x * 64));
        put_varint(world.wire, static_cast<int32_t>(p.pos.y * 64));
        int r = static_cast<int>(kViewRadius) / kBucket + 1;
        int bx = std::clamp(static_cast<int>(p.pos.x) / kBucket, 0, kBuckets - 1);
        int by = std::clamp(static_cast<int>(p.pos.y) / kBucket, 0, kBuckets - 1);
        for (int y = std::max(0, by - r); y <= std::min(kBuckets - 1, by + r); y++)
            for (int x = std::max(0, bx - r); x <= std::min(kBuckets - 1, bx + r); x++)
                for (uint32_t slot : world.buckets[y * kBuckets + x]) {
                    const Player &o = *world.players[slot];
                    float dx = o.pos.x - p.pos.x, dy = o.pos.y - p.pos.y;
                    if (dx * dx + dy * dy > kViewRadius * kViewRadius)
                        continue;
                    put_varint(world.wire, static_cast<int32_t>(o.id));
                    put_varint(world.wire, static_cast<int32_t>(dx * 64));
                    put_varint(world.wire, static_cast<int32_t>(dy * 64));
                    put_varint(world.wire, static_cast<int32_t>(o.vel.x * 64));
                    put_varint(world.wire, static_cast<int32_t>(o.vel.y * 64));
                    put_varint(world.wire, o.hp);
                    if (snap.visible_count < 112)
                        snap.visible[snap.visible_count++] = static_cast<uint16_t>(o.id);
                }
        uint32_t sum = 2166136261u;
        for (uint8_t b : world.wire)
            sum = (sum ^ b) * 16777619u;
        snap.checksum = sum;
        world.checksum += sum;
        if (!p.bot && sendto(world.sock, world.wire.data(), world.wire.size(), MSG_DONTWAIT,
                             reinterpret_cast<const sockaddr *>(&p.addr), sizeof p.addr) < 0 &&
            errno != EAGAIN && errno != ECONNREFUSED)
            perror("game-server: sendto");
        (*p.history)[world.tick % kHistory] = snap;
    }
}

// ---------------------------------------------------------------- measurement

// Log-linear histogram of microseconds: 64 buckets per power of two (~1.5 %).
struct Histogram {
    static constexpr int kBuckets = 64 + 58 * 64;
    std::vector<uint64_t> count = std::vector<uint64_t>(kBuckets);
    uint64_t n = 0, max = 0;

    static int bucket_of(uint64_t us) {
        if (us < 64)
            return static_cast<int>(us);
        int e = 63 - __builtin_clzll(us);
        return 64 + (e - 6) * 64 + static_cast<int>((us >> (e - 6)) & 63);
    }
    static uint64_t value_of(int b) {
        if (b < 64)
            return static_cast<uint64_t>(b);
        int e = (b - 64) / 64 + 6;
        return static_cast<uint64_t>(64 + (b - 64) % 64) << (e - 6);
    }
    void add(uint64_t us) {
        count[bucket_of(us)]++;
        n++;
        max = std::max(max, us);
    }
    uint64_t percentile(double pct) const {
        if (n == 0)
            return 0;
        uint64_t rank = std::min(n - 1, static_cast<uint64_t>(pct / 100.0 * static_cast<double>(n)));
        uint64_t seen = 0;
        for (int b = 0; b < kBuckets; b++) {
            seen += count[b];
            if (seen > rank)
                return std::min(value_of(b), max);
        }
        return max;
    }
    void clear() {
        std::fill(count.begin(), count.end(), 0);
        n = max = 0;
    }
};

enum System { kNetwork, kAi, kPhysics, kSerialize, kSessions, kSystems };
const char *const system_names[kSystems] = {"network", "ai", "physics", "serialize", "sessions"};

struct Interval {
    Histogram frames, cpu_frames; // wall and CPU time per tick
    uint64_t ticks = 0, overruns = 0;
    double system_seconds[kSystems] = {}; // total per system
    double system_max[kSystems] = {};     // slowest tick per system
    double pathfinding = 0;
    double start = 0;
    void reset(double t) {
        frames.clear();
        cpu_frames.clear();
        ticks = overruns = 0;
        std::fill(std::begin(system_seconds), std::end(system_seconds), 0.0);
        std::fill(std::begin(system_max), std::end(system_max), 0.0);
        pathfinding = 0;
        start = t;
    }
};

void print_report(const Interval &iv, double t) {
    double secs = t - iv.start;
    double per_tick = iv.ticks ? 1e6 / static_cast<double>(iv.ticks) : 0;
    printf("report t=%.2f ticks=%llu ticks_per_sec=%.1f frame_p50_us=%llu frame_p90_us=%llu frame_p99_us=%llu "
           "frame_max_us=%llu frame_cpu_p50_us=%llu frame_cpu_p90_us=%llu frame_cpu_p99_us=%llu overruns=%llu "
           "players=%zu replay_entries=%zu",
           t - start_time, static_cast<unsigned long long>(iv.ticks), iv.ticks / secs,
           static_cast<unsigned long long>(iv.frames.percentile(50)),
           static_cast<unsigned long long>(iv.frames.percentile(90)),
           static_cast<unsigned long long>(iv.frames.percentile(99)),
           static_cast<unsigned long long>(iv.frames.max),
           static_cast<unsigned long long>(iv.cpu_frames.percentile(50)),
           static_cast<unsigned long long>(iv.cpu_frames.percentile(90)),
           static_cast<unsigned long long>(iv.cpu_frames.percentile(99)), static_cast<unsigned long long>(iv.overruns),
           world.players.size(), world.replay.size());
    for (int s = 0; s < kSystems; s++)
        printf(" %s_us=%.0f %s_max_us=%.0f", system_names[s], iv.system_seconds[s] * per_tick, system_names[s],
               iv.system_max[s] * 1e6);
    printf(" pathfinding_us=%.0f incident_active=%d\n", iv.pathfinding * per_tick,
           opt.incident != Incident::None && t >= incident_start ? 1 : 0);
    fflush(stdout);
}

// One frame: every system in order, each one's end time in marks[1..]
// (marks[0] is the start). Named and out of line: the frame function a
// latency probe times (the preset probes it); its duration is the frame
// time this server reports.
NAMED void game_tick(double period, double *marks) {
    marks[0] = now_s();
    network_poll();
    marks[1] = now_s();
    ai_update();
    marks[2] = now_s();
    physics_step(period);
    marks[3] = now_s();
    serialize_snapshot();
    marks[4] = now_s();
    update_sessions(period);
    marks[5] = now_s();
    world.tick++;
}

void on_signal(int) {
    running = 0;
}

[[noreturn]] void usage() {
    fprintf(stderr, "usage: game-server [--port N] [--tick-hz HZ] [--players N] [--churn PER_SEC]\n"
                    "                   [--incident frame-spike|leak|hot-path|abort] [--incident-after S]\n"
                    "                   [--duration S] [--report-every S]\n");
    exit(2);
}

double parse_num(const char *s, double min, double max) {
    char *end;
    double v = strtod(s, &end);
    if (*end || end == s || !(v >= min && v <= max))
        usage();
    return v;
}

// Walls: a border, then random short wall segments over ~12 % of the map.
void build_map() {
    for (int i = 0; i < kGrid; i++) {
        world.walls[i] = world.walls[(kGrid - 1) * kGrid + i] = 1;
        world.walls[i * kGrid] = world.walls[i * kGrid + kGrid - 1] = 1;
    }
    Rng rng{42};
    for (int s = 0; s < kCells * 12 / 100 / 6; s++) {
        int x = 2 + static_cast<int>(rng.next() % (kGrid - 10)), y = 2 + static_cast<int>(rng.next() % (kGrid - 10));
        bool horizontal = rng.next() & 1;
        for (int k = 0; k < 6; k++)
            world.walls[(y + (horizontal ? 0 : k)) * kGrid + x + (horizontal ? k : 0)] = 1;
    }
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        if (i + 1 >= argc)
            usage();
        const char *v = argv[++i];
        if (a == "--port")
            opt.port = static_cast<int>(parse_num(v, 1, 65535));
        else if (a == "--tick-hz")
            opt.tick_hz = parse_num(v, 1, 10000);
        else if (a == "--players")
            opt.players = static_cast<int>(parse_num(v, 0, 100000));
        else if (a == "--churn")
            opt.churn = parse_num(v, 0, 100000);
        else if (a == "--incident-after")
            opt.incident_after = parse_num(v, 0, 1e9);
        else if (a == "--duration")
            opt.duration = parse_num(v, 0, 1e9);
        else if (a == "--report-every")
            opt.report_every = parse_num(v, 0, 1e9);
        else if (a == "--incident") {
            std::string name = v;
            if (name == "frame-spike")
                opt.incident = Incident::FrameSpike;
            else if (name == "leak")
                opt.incident = Incident::Leak;
            else if (name == "hot-path")
                opt.incident = Incident::HotPath;
            else if (name == "abort")
                opt.incident = Incident::Abort;
            else
                usage();
        } else
            usage();
    }

    struct sigaction sa{};
    sa.sa_handler = on_signal; // no SA_RESTART: the tick sleep ends at once
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, nullptr);
    sigaction(SIGTERM, &sa, nullptr);

    world.sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (world.sock < 0) {
        perror("game-server: socket");
        return 1;
    }
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(opt.port));
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(world.sock, reinterpret_cast<sockaddr *>(&addr), sizeof addr) < 0) {
        fprintf(stderr, "game-server: UDP port %d: %s\n", opt.port, strerror(errno));
        return 1;
    }

    build_map();
    for (int i = 0; i < opt.players; i++)
        spawn_player(true);
    world.wire.reserve(4096);

    start_time = now_s();
    incident_start = opt.incident == Incident::None ? 1e300 : start_time + opt.incident_after;
    printf("game-server pid %d port %d tick-hz %g players %d\n", getpid(), opt.port, opt.tick_hz, opt.players);
    fflush(stdout);

    const double period = 1.0 / opt.tick_hz;
    Histogram all, all_cpu;
    uint64_t ticks = 0, overruns = 0;
    Interval iv;
    iv.reset(start_time);
    double next = start_time, last_report = start_time;
    bool announced = false;
    while (running && (opt.duration <= 0 || now_s() - start_time < opt.duration)) {
        double t0 = now_s(), cpu0 = thread_cpu_s();
        if (!announced && t0 >= incident_start) {
            fprintf(stderr, "game-server: incident on\n");
            announced = true;
        }
        double marks[kSystems + 1];
        double path_before = pathfinding_seconds;
        game_tick(period, marks);

        double frame = marks[kSystems] - marks[0];
        auto us = static_cast<uint64_t>(frame * 1e6);
        auto cpu_us = static_cast<uint64_t>((thread_cpu_s() - cpu0) * 1e6);
        all.add(us);
        all_cpu.add(cpu_us);
        iv.frames.add(us);
        iv.cpu_frames.add(cpu_us);
        ticks++;
        iv.ticks++;
        if (frame > period) {
            overruns++;
            iv.overruns++;
        }
        for (int s = 0; s < kSystems; s++) {
            iv.system_seconds[s] += marks[s + 1] - marks[s];
            iv.system_max[s] = std::max(iv.system_max[s], marks[s + 1] - marks[s]);
        }
        iv.pathfinding += pathfinding_seconds - path_before;

        double t1 = marks[kSystems];
        if (opt.report_every > 0 && t1 - last_report >= opt.report_every) {
            print_report(iv, t1);
            iv.reset(t1);
            last_report = t1;
        }
        // Fixed rate: the next tick is one period after this one started;
        // when late, start it now rather than trying to catch up.
        next += period;
        if (next < t1)
            next = t1;
        timespec ts{static_cast<time_t>(next), static_cast<long>((next - static_cast<time_t>(next)) * 1e9)};
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nullptr);
    }
    double elapsed = now_s() - start_time;
    printf("summary ticks=%llu ticks_per_sec=%.1f frame_p50_us=%llu frame_p99_us=%llu frame_max_us=%llu "
           "frame_cpu_p50_us=%llu frame_cpu_p99_us=%llu overruns=%llu players=%zu departed=%llu replay_entries=%zu "
           "checksum=%llu\n",
           static_cast<unsigned long long>(ticks), ticks / elapsed,
           static_cast<unsigned long long>(all.percentile(50)), static_cast<unsigned long long>(all.percentile(99)),
           static_cast<unsigned long long>(all.max), static_cast<unsigned long long>(all_cpu.percentile(50)),
           static_cast<unsigned long long>(all_cpu.percentile(99)), static_cast<unsigned long long>(overruns),
           world.players.size(), static_cast<unsigned long long>(world.departed), world.replay.size(),
           static_cast<unsigned long long>(world.checksum % 1000000));
    fflush(stdout);
    return 0;
}
