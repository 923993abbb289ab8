// A small stateful JVM service: an in-memory map filled at the start and changed by requests,
// served over HTTP (the JDK's com.sun.net.httpserver). Run with the source launcher:
//   java -XX:-UsePerfData StateServer.java
//
//   GET  /         -> JSON: {"size": entries, "boot": a random id drawn at the cold start,
//                            "requests": requests answered, "ticks": a background thread's count}
//   GET  /k/NAME   -> the value of NAME (404 if absent)
//   POST /k/NAME   -> the request body becomes the value of NAME
import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.IOException;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.Map;
import java.util.UUID;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicLong;

public class StateServer {
    static final Map<String, String> map = new ConcurrentHashMap<>();
    static final String boot = UUID.randomUUID().toString();
    static final AtomicLong requests = new AtomicLong();
    static final AtomicLong ticks = new AtomicLong();

    static void reply(HttpExchange ex, int code, String body) throws IOException {
        byte[] data = body.getBytes(StandardCharsets.UTF_8);
        ex.sendResponseHeaders(code, data.length == 0 ? -1 : data.length);
        try (OutputStream out = ex.getResponseBody()) {
            out.write(data);
        }
    }

    public static void main(String[] args) throws Exception {
        int entries = Integer.parseInt(System.getenv().getOrDefault("ENTRIES", "100000"));
        for (int i = 0; i < entries; i++) {
            map.put("key-" + i, "value-" + i);
        }
        Thread ticker = new Thread(() -> {
            while (true) {
                ticks.incrementAndGet();
                try {
                    Thread.sleep(50);
                } catch (InterruptedException e) {
                    return;
                }
            }
        });
        ticker.setDaemon(true);
        ticker.start();

        HttpServer server = HttpServer.create(new InetSocketAddress("127.0.0.1", Integer.parseInt(System.getenv("PORT"))), 16);
        server.createContext("/", ex -> {
            requests.incrementAndGet();
            String path = ex.getRequestURI().getPath();
            if (path.startsWith("/k/")) {
                String key = path.substring(3);
                if (ex.getRequestMethod().equals("POST")) {
                    map.put(key, new String(ex.getRequestBody().readAllBytes(), StandardCharsets.UTF_8));
                    reply(ex, 200, "{\"size\": " + map.size() + "}");
                } else {
                    String v = map.get(key);
                    reply(ex, v == null ? 404 : 200, v == null ? "" : v);
                }
            } else {
                reply(ex, 200, String.format("{\"size\": %d, \"boot\": \"%s\", \"requests\": %d, \"ticks\": %d}",
                        map.size(), boot, requests.get(), ticks.get()));
            }
        });
        server.start();
        System.out.println("StateServer: " + map.size() + " entries, listening on " + server.getAddress());
    }
}
