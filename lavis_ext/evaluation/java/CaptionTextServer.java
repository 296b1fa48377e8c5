/*
 * A long-lived JVM for caption scoring's Java tools: Stanford's PTB tokenizer (as pycocoevalcap runs it), METEOR's
 * reference normaliser (MeteorNormalize) and METEOR itself.
 *
 * Why: each pass used to start a JVM of its own on every scoring call; the JVM start, the class loading, the
 * tokenizer's lexer tables and the normaliser's word map were paid again each time, cold (interpreted code), on
 * the critical path of a call. Here they are paid once per Python process, and later calls run warm code.
 *
 * Exactness: a PTB request calls edu.stanford.nlp.process.PTBTokenizer.main with pycocoevalcap's arguments on the
 * request's input file, with System.out sent to the request's output file: the command-line tool's own code, its
 * output byte for byte. A METEOR request calls Meteor.main with the request's arguments, System.in read from its
 * input file and System.out sent to its output file (with -stdio, METEOR scores SCORE / EVAL lines until the input
 * ends, then returns). A NORM request runs MeteorNormalize.normalize on the request's file.
 *
 * Protocol (UTF-8 lines of tab-separated fields on stdin / stdout; one request at a time):
 *   PTB <input file> <output file>            -> "OK" once the output file is complete
 *   NORM <language> <words.txt> <input file> <output file> -> "OK"
 *   METEOR <input file> <output file> <argument>...  -> "OK"
 *   anything that fails                       -> "ERROR <one line>", and the server goes on
 * The server ends when stdin closes.
 *
 * Compiled once against stanford-corenlp-3.4.1.jar and meteor-1.5.jar into the cache directory
 * (lavis_ext/evaluation/text_server.py); run with both jars and MeteorNormalize on the class path.
 */
import java.io.BufferedReader;
import java.io.FileOutputStream;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.io.PrintWriter;
import java.io.StringWriter;
import java.nio.charset.StandardCharsets;

public class CaptionTextServer {
    public static void main(String[] args) throws Exception {
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        PrintStream reply = new PrintStream(new FileOutputStream(java.io.FileDescriptor.out), true, "UTF-8");
        String line;
        while ((line = in.readLine()) != null) {
            String[] parts = line.split("\t");
            try {
                if (parts[0].equals("PTB") && parts.length == 3) {
                    tokenize(parts[1], parts[2]);
                } else if (parts[0].equals("NORM") && parts.length == 5) {
                    MeteorNormalize.normalize(parts[1], parts[2], parts[3], parts[4]);
                } else if (parts[0].equals("METEOR") && parts.length >= 3) {
                    meteor(parts[1], parts[2], java.util.Arrays.copyOfRange(parts, 3, parts.length));
                } else {
                    throw new IllegalArgumentException("unknown request: " + line);
                }
                reply.println("OK");
            } catch (Throwable error) {
                StringWriter trace = new StringWriter();
                error.printStackTrace(new PrintWriter(trace));
                reply.println("ERROR " + trace.toString().replace('\n', ' ').replace('\r', ' '));
            }
            // After the answer, while the caller works: a full collection, so that the heap (and what the process
            // holds between calls) shrinks back to what is live (-XX:MaxHeapFreeRatio, text_server.py).
            System.gc();
        }
    }

    private static void meteor(String input, String output, String[] args) throws Exception {
        java.io.InputStream savedIn = System.in;
        PrintStream savedOut = System.out;
        try (java.io.InputStream in = new java.io.BufferedInputStream(new java.io.FileInputStream(input), 1 << 16);
             PrintStream out = new PrintStream(new java.io.BufferedOutputStream(new FileOutputStream(output), 1 << 16),
                                               false, "UTF-8")) {
            System.setIn(in);
            System.setOut(out);
            Meteor.main(args);
            out.flush();
        } finally {
            System.setIn(savedIn);
            System.setOut(savedOut);
        }
    }

    private static void tokenize(String input, String output) throws Exception {
        PrintStream saved = System.out;
        PrintStream savedErr = System.err;
        try (PrintStream out = new PrintStream(new FileOutputStream(output), false, "UTF-8")) {
            System.setOut(out);
            System.setErr(new PrintStream(new java.io.OutputStream() { public void write(int b) { } }));  // its "tokenized N tokens" line
            edu.stanford.nlp.process.PTBTokenizer.main(new String[] {"-preserveLines", "-lowerCase", input});
            out.flush();
        } finally {
            System.setOut(saved);
            System.setErr(savedErr);
        }
    }
}
