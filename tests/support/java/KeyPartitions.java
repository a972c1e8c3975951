// For each key on stdin (one per line, UTF-8), prints the partition Kafka's
// own Java producer chooses for it among the number of partitions given as
// the only argument. Run by tests/partitioning.rs with the stack's Kafka jars
// on the class path: the reference that outboxd's placement is checked against.

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;

import org.apache.kafka.clients.producer.internals.BuiltInPartitioner;

public class KeyPartitions {
    public static void main(String[] args) throws Exception {
        int partitions = Integer.parseInt(args[0]);
        BufferedReader keys =
                new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        StringBuilder out = new StringBuilder();
        String key;
        while ((key = keys.readLine()) != null) {
            byte[] serialized = key.getBytes(StandardCharsets.UTF_8);
            out.append(BuiltInPartitioner.partitionForKey(serialized, partitions)).append('\n');
        }
        System.out.print(out);
    }
}
